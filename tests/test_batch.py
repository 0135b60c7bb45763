import json

from pixart_core.batch import read_jobs


def test_bad_lines_reported_with_number_and_skipped(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([json.dumps({"prompt": "a cat", "seed": 1}), "{not json",
                               json.dumps({"prompt": "x", "steps": 0}), "", json.dumps({"prompt": "a dog"})]))
    requests, errors = read_jobs(jobs)
    assert [r.prompt for r in requests] == ["a cat", "a dog"]
    assert [n for n, _ in errors] == [2, 3]
    assert "line 3" in errors[1][1] and "steps" in errors[1][1]
    assert requests[1].steps == 20  # default for an absent field


def test_request_key_stable_and_distinct(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a", "seed": 1}) + "\n" + json.dumps({"seed": 1, "prompt": "a"}) + "\n"
                    + json.dumps({"prompt": "a", "seed": 2}))
    (a, b, c), _ = read_jobs(jobs)
    assert a.key() == b.key() != c.key()


def test_unknown_sampler_preset_and_bad_layer_list_are_reported(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"prompt": "a cat", **extra}) for extra in (
        {"sampler": "heun"}, {"preset": "sigma-8k"}, {"kv_layers": "14-"}, {"kv_layers": 14},
        {"preset": "sigma-2k-ms", "kv_layers": "14-27", "sampler": "sa_solver"})))
    requests, errors = read_jobs(jobs)
    assert [(r.preset, r.kv_layers, r.sampler) for r in requests] == [("sigma-2k-ms", "14-27", "sa_solver")]
    assert [n for n, _ in errors] == [1, 2, 3, 4]
    assert "unknown sampler 'heun'" in errors[0][1] and "unknown preset 'sigma-8k'" in errors[1][1]
    assert "kv_layers must be text" in errors[3][1]
