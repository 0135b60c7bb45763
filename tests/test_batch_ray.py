"""The batch job on a local Ray cluster (one cluster for the module: starting Ray takes seconds)."""
import os

import pytest

from pixart_core.batch import run_local
from tests import batch_fixtures as bf

ray = pytest.importorskip("ray", reason='the Ray runner needs pip install "ray[data]"')
pytest.importorskip("ray.data")
from pixart_core import batch_ray  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUESTS = [bf.REQUESTS[i] for i in (0, 1, 2, 4, 0)]  # two bins, sa_solver, a duplicate line


def quiet(_):
    pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_ray")
    crash = root / "crash-next-sampling-call"
    # Workers import this checkout and use the same MKL code path as this process (tests/conftest.py),
    # so CPU results are byte-identical across processes.
    env = {"PYTHONPATH": REPO, "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT"), batch_ray.CRASH_ENV: str(crash)}
    ray.init(num_cpus=2, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
    ckpt, t5 = bf.write_models(root)
    jobs = bf.write_jobs(root / "jobs.jsonl", REQUESTS)
    local = root / "local"
    assert run_local(jobs, local, bf.settings(ckpt, t5), progress=False, say=quiet).done == 4
    yield root, bf.settings(ckpt, t5), jobs, bf.outputs(local), crash
    ray.shutdown()


def run(cluster, out, actors=1):
    root, settings, jobs, _, _ = cluster
    return batch_ray.run_ray(jobs, root / out, settings, address=None, actors=actors, cpus_per_actor=0.5,
                             progress=False, say=quiet)


@pytest.fixture(scope="module")
def killed_run(cluster):
    """One Ray job (each Ray job costs seconds of actor start-up) whose sampling worker is killed at
    its first chunk: Ray restarts it and redoes that chunk."""
    root, _, _, _, crash = cluster
    crash.touch()  # the next sampling call kills its actor's process
    summary = run(cluster, "ray", actors=2)
    assert not crash.exists()  # a worker did die mid-job
    return root / "ray", summary


def test_ray_outputs_equal_local_byte_for_byte(cluster, killed_run):
    out, summary = killed_run
    assert (summary.done, summary.skipped, summary.failed) == (4, 0, 0)
    assert bf.outputs(out) == cluster[3]


def test_killed_sampling_worker_loses_and_duplicates_nothing(cluster, killed_run):
    out, _ = killed_run
    entries = bf.manifest(out)
    assert sorted(e["key"] for e in entries) == sorted(k[:-len(".latent")] for k in cluster[3])
    assert all(e["status"] == "done" and (out / e["file"]).is_file() for e in entries)
    assert sorted(e["lines"] for e in entries) == [[1, 5], [2], [3], [4]]
    assert not list(out.glob("*.part"))  # no half-written file left behind


def test_ray_rerun_does_no_work(cluster, killed_run):
    out, _ = killed_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.latent")}
    again = run(cluster, "ray")
    assert (again.done, again.skipped, again.failed) == (0, 4, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.latent")} == before
    assert len(bf.manifest(out)) == 4
