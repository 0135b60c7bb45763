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
