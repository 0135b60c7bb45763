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


# ------------------------------------------------------------------------------------------- running

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from pixart_core import batch as batch_module  # noqa: E402
from pixart_core.__main__ import main as cli  # noqa: E402
from pixart_core.batch import Request, run_local  # noqa: E402
from pixart_core.loading import load_pixart  # noqa: E402
from pixart_core.pipeline import Conditioning, generate  # noqa: E402
from pixart_core.t5 import load_t5  # noqa: E402
from tests import batch_fixtures as bf  # noqa: E402
from tests import pixart_fixtures as pf  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bf.write_models(tmp_path_factory.mktemp("batch_models"))


@pytest.fixture(scope="module")
def first_run(models, tmp_path_factory):
    """The reference job, run once for the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("batch_run")
    jobs = bf.write_jobs(root / "jobs.jsonl", bf.REQUESTS)
    out = root / "out"
    summary = run_local(jobs, out, bf.settings(*models), progress=False, say=lambda _: None)
    return jobs, out, summary


def _latent(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latent_tensor"), f.metadata()


def test_local_outputs_are_the_pipeline_images_named_by_request_hash(first_run, models):
    jobs, out, summary = first_run
    assert (summary.done, summary.skipped, summary.failed, summary.invalid) == (6, 0, 0, 0)
    requests, _ = read_jobs(jobs)
    keys = sorted({r.key() for r in requests})
    assert sorted(bf.outputs(out)) == [f"{k}.latent" for k in keys]
    # Each file is what the pipeline gives for that request alone (a batch of one): equal up to the
    # last bits, which depend on the batch shape (byte equality is at a fixed batch size, below).
    ckpt, t5 = models
    model = load_pixart(ckpt).model.eval()
    encoder = load_t5(t5, dtype="fp32")
    for r in requests[:6]:
        latents, meta = _latent(out / f"{r.key()}.latent")
        prompt = Conditioning(*encoder.encode([r.prompt], max_length=model.config.model_max_length))
        negative = Conditioning(*encoder.encode([r.negative], max_length=model.config.model_max_length))
        alone = generate(model, prompt, negative, height=r.height, width=r.width, steps=r.steps, sampler=r.sampler,
                         guidance=r.guidance, seed=r.seed).latents
        assert latents.shape == alone.shape
        assert pf.rel_err(latents, alone) < 1e-5
        want = f"{r.height or 256}x{r.width or 256}"
        assert meta["requested"] == want and meta["seed"] == str(r.seed)
    wide = _latent(out / f"{requests[2].key()}.latent")[1]
    assert (wide["height"], wide["width"]) != ("256", "256")  # the wide request got its own bin


def test_batched_equals_alone_byte_for_byte(first_run, models, tmp_path):
    _, out, _ = first_run
    together = bf.outputs(out)
    for i in (1, 4):  # a plain one and an sa_solver one (per-request noise at every step)
        jobs = bf.write_jobs(tmp_path / f"one{i}.jsonl", [bf.REQUESTS[i]])
        alone_out = tmp_path / f"alone{i}"
        summary = run_local(jobs, alone_out, bf.settings(*models), progress=False, say=lambda _: None)
        assert summary.done == 1
        (name, data), = bf.outputs(alone_out).items()
        assert together[name] == data


def test_manifest_has_one_line_per_request_with_its_lines(first_run):
    _, out, _ = first_run
    entries = bf.manifest(out)
    assert len(entries) == len({e["key"] for e in entries}) == 6
    assert all(e["status"] == "done" and (out / e["file"]).is_file() for e in entries)
    assert next(e for e in entries if e["prompt"] == "a red cube")["lines"] == [1, 7]


def test_rerun_does_no_work(first_run, models, monkeypatch):
    jobs, out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.latent")}

    def fail(*a, **k):
        raise AssertionError("a rerun must not load or sample anything")
    monkeypatch.setattr(batch_module, "sample_chunk", fail)
    monkeypatch.setattr("pixart_core.t5.load_t5", fail)
    summary = run_local(jobs, out, bf.settings(*models), progress=False, say=lambda _: None)
    assert (summary.done, summary.skipped, summary.failed) == (0, 6, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.latent")} == before
    assert len(bf.manifest(out)) == 6


def test_failed_requests_are_recorded_and_the_job_goes_on(models, tmp_path, capsys):
    ckpt, t5 = models
    requests = [bf.REQUESTS[0],
                {"prompt": "too deep", "kv_layers": "5", "steps": 2},  # the tiny model has layers 0-1
                {"prompt": "wrong model", "preset": "alpha-512", "steps": 2},  # weights do not fit the preset
                bf.REQUESTS[3]]
    jobs = bf.write_jobs(tmp_path / "jobs.jsonl", requests, ["{broken", '{"prompt": "x", "sampler": "heun"}'])
    out = tmp_path / "out"
    code = cli(["batch", str(jobs), "--out", str(out), "--model", str(ckpt), "--t5", str(t5), "--t5-dtype", "fp32",
                "--device", "cpu", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "line 5: not JSON" in printed and "line 6: unknown sampler 'heun'" in printed
    assert "2 done, 0 skipped (already there), 2 failed, 2 bad lines" in printed
    assert "writing .latent files" in printed
    entries = {e["prompt"]: e for e in bf.manifest(out)}
    assert entries["too deep"]["status"] == "failed" and "layers 0-1" in entries["too deep"]["error"]
    assert entries["wrong model"]["status"] == "failed" and entries["wrong model"]["lines"] == [3]
    assert entries["wrong model"]["error"]
    assert [entries[p]["status"] for p in ("a red cube", "a green tree")] == ["done", "done"]
    assert len(bf.outputs(out)) == 2


def test_output_folder_of_another_job_is_refused(first_run, models, tmp_path):
    jobs, out, _ = first_run
    other = bf.settings(*models, null_mode="own_mask")
    with pytest.raises(batch_module.InputError, match="null_mode: prompt_mask now own_mask"):
        run_local(jobs, out, other, progress=False, say=lambda _: None)


def test_png_decoded_with_a_vae_at_the_requested_size(models, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    jobs = bf.write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a tall tower", "width": 200, "height": 300, "steps": 2}])
    said = []
    summary = run_local(jobs, tmp_path / "out", bf.settings(*models, vae=str(tmp_path / "vae")), progress=False,
                        say=said.append)
    assert summary.done == 1 and any("decoding to PNG" in s for s in said)
    (path,) = (tmp_path / "out").glob("*.png")
    with Image.open(path) as im:
        assert im.size == (200, 300) and im.mode == "RGB" and im.text["prompt"] == "a tall tower"
    assert path.stem == Request(**{**batch_module.FIELDS, "prompt": "a tall tower", "width": 200, "height": 300,
                                   "steps": 2}).key()


def test_per_request_seeds_give_the_single_seed_noise():
    """generate(seeds=[s]) draws exactly what generate(seed=s) draws, sa_solver's step noise included."""
    from tests.pixart_fixtures import random_model
    model = random_model().eval()
    L = model.config.model_max_length
    g = torch.Generator().manual_seed(3)
    cond = Conditioning(torch.randn(1, L, 32, generator=g), torch.ones(1, L, dtype=torch.long))
    for sampler in ("dpmpp_2m", "sa_solver", "ddim"):
        a = generate(model, cond, cond, steps=2, sampler=sampler, seed=7).latents
        b = generate(model, cond, cond, steps=2, sampler=sampler, seeds=[7]).latents
        assert torch.equal(a, b)


def test_ray_missing_is_one_sentence_before_any_work(models, tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pixart_core.batch_ray", raising=False)
    ckpt, t5 = models
    jobs = bf.write_jobs(tmp_path / "jobs.jsonl", [bf.REQUESTS[0]])
    code = cli(["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(ckpt), "--t5", str(t5),
                "--ray", "auto"])
    assert code == 2
    assert capsys.readouterr().err.strip() == 'error: --ray needs Ray Data, which is not installed: pip install "ray[data]"'
    assert not (tmp_path / "out").exists()


def test_embedding_cache_encodes_each_text_once_and_keeps_little():
    class Counting:
        calls = []

        def encode(self, texts, max_length):
            self.calls.append(list(texts))
            n = len(texts)
            return torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, max_length, 2), \
                torch.ones(n, max_length, dtype=torch.long)
    make = lambda p, s: Request(**{**batch_module.FIELDS, "prompt": p, "seed": s})  # noqa: E731
    chunks = [batch_module.Chunk("auto", None, (256, 256), 4, [str(i)], [make(p, i)])
              for i, p in enumerate(["a", "b", "a", "c", "d", "b"])]
    enc = Counting()
    cache = batch_module.EmbeddingCache(enc, chunks, batch=2)
    sizes = []
    for c in chunks:
        prompt, negative = cache.get(c)
        assert prompt.embeds.shape == (1, 4, 2)
        sizes.append(len(cache.embeddings))
    encoded = [t for call in enc.calls for t in call]
    assert sorted(encoded) == ["", "a", "b", "c", "d"] and max(len(c) for c in enc.calls) <= 2
    assert sizes[-1] == 0 and max(sizes) <= 4
