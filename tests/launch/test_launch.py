"""Launch paths against real launchers: Slurm on localhost (sbatch, srun, requeue, arrays) and
torchrun with a two-node rendezvous on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY, cli_env, read_metrics, run_cli, sets
from trainer.launch import SlurmJob, torchrun_command

PRESET = str(REPO / "configs/gpt/debug.yaml")
STEPS = 40


def _train_args(corpus) -> list[str]:
    return [*TINY, f"data.source={corpus}", f"train.steps={STEPS}", "train.global_batch_size=8",
            "checkpoint.every=10"]


def test_rendered_scripts_pass_bash_n_and_shellcheck(shellcheck, tmp_path):
    variants = {
        "cpu": SlurmJob(PRESET, nproc_per_node=2),
        "gpu-multinode": SlurmJob(PRESET, nodes=4, gpus_per_node=8, partition="gpu", account="proj",
                                  qos="high", time="12:00:00", overrides=["parallel.zero_stage=2"]),
        "array": SlurmJob("plans/p/point_%a.yaml", array="0-11%4", run_dir="runs/p-%a"),
    }
    scripts = {name: job.render() for name, job in variants.items()}
    scripts["prepare"] = SlurmJob(PRESET, prepare_parts=3, cpus_per_task=2, partition="cpu").render()
    scripts["eval-follow"] = SlurmJob(PRESET, run_dir="runs/a b", eval_follow=True, partition="cpu",
                                      eval_args=["--tasks", "hellaswag", "--limit", "50"]).render_eval()
    for name, text in scripts.items():
        path = tmp_path / f"{name}.sbatch"
        path.write_text(text)
        for cmd in (["bash", "-n", str(path)], [shellcheck, "-S", "style", str(path)]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            assert p.returncode == 0, f"{name}: {' '.join(cmd)}\n{p.stdout}{p.stderr}"
    for script in (REPO / "launch/torchrun.sh", REPO / "tests/launch/local_slurm.sh"):
        p = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_rendered_script_contents():
    s = SlurmJob(PRESET, nodes=2, gpus_per_node=4, signal_seconds=300, partition="p").render()
    assert "#SBATCH --nodes=2" in s and "#SBATCH --gpus-per-node=4" in s and "#SBATCH --partition=p" in s
    assert "#SBATCH --signal=B:USR1@300" in s and "#SBATCH --requeue" in s
    assert 'MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))' in s
    assert "scontrol show hostnames" in s and "--rdzv_backend=c10d" in s
    assert "--nproc_per_node=\"$NPROC_PER_NODE\"" in s and "NPROC_PER_NODE=4" in s
    assert "@@" not in s
    arr = SlurmJob("p_%a.yaml", array="0-2").render()
    assert "#SBATCH --array=0-2" in arr and "%x-%A_%a.out" in arr
    with pytest.raises(Exception, match="no --array"):
        SlurmJob("p_%a.yaml").render()
    prep = SlurmJob(PRESET, prepare_parts=3, cpus_per_task=2).render()
    assert "#SBATCH --array=0-2" in prep and '--part "${SLURM_ARRAY_TASK_ID}/3"' in prep
    assert "-m trainer data prepare" in prep and "@@" not in prep
    with pytest.raises(Exception, match="--prepare takes --parts N"):
        SlurmJob(PRESET, prepare_parts=2, array="0-3").render()


def test_torchrun_commands():
    one = torchrun_command("c.yaml", 4, overrides=["train.lr=1e-3"], python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nproc_per_node=4", "--max_restarts=0",
                   "--standalone", "-m", "trainer", "train", "c.yaml", "--set", "train.lr=1e-3"]
    two = torchrun_command("c.yaml", 8, nnodes=2, node_rank=1, master_addr="n1", master_port=1234)
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=n1", "--master_port=1234"} <= set(two)


@pytest.mark.distributed
def test_two_node_rendezvous_matches_single_node(tiny_corpus, cache_dir, tmp_path):
    """Two torchrun agents (--nnodes=2, one process each) on 127.0.0.1 train like one node with dp2."""
    args = [*_train_args(tiny_corpus), "train.steps=8", "checkpoint.every=0"]
    run_cli(["train", PRESET, "--run-dir", str(tmp_path / "single"), *sets(*args)], cache_dir, nproc=2)
    from trainer.distributed import free_port

    port = free_port()
    agents = [
        subprocess.Popen(
            torchrun_command(PRESET, 1, nnodes=2, node_rank=r, master_addr="127.0.0.1", master_port=port,
                             overrides=args, run_dir=str(tmp_path / "multi"), python=sys.executable),
            cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outs
    single, _ = read_metrics(tmp_path / "single")
    multi, _ = read_metrics(tmp_path / "multi")
    assert [r["loss"] for r in multi] == pytest.approx([r["loss"] for r in single], abs=1e-6)


# ----------------------------------------------------------------------------- real Slurm


def _submit(cache_dir, *argv: str, wait: bool = True) -> str:
    p = subprocess.run([sys.executable, "-m", "trainer", "launch", "slurm", *argv, "--submit",
                        *(["--wait"] if wait else [])],
                       cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().split(";")[0]


def _job_state(job: str) -> str | None:
    p = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    for tok in p.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def slurm_run(slurm, cache_dir, tmp_path_factory):
    """The debug GPT as a 2-task CPU job through `sbatch --wait` (uninterrupted)."""
    from tests.conftest import make_corpus

    root = tmp_path_factory.mktemp("slurm")
    corpus = make_corpus(root / "corpus")
    t0 = time.time()
    _submit(cache_dir, PRESET, "--nproc-per-node", "2", "--time", "00:10:00", "--log-dir", str(root / "logs"),
            "--run-dir", str(root / "run"), *sets(*_train_args(corpus)))
    return root, corpus, time.time() - t0


@pytest.mark.slurm
def test_slurm_job_trains_with_two_tasks(slurm_run, cache_dir):
    root, corpus, seconds = slurm_run
    rows, evals = read_metrics(root / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and evals
    log = next((root / "logs").glob("*.out")).read_text()
    assert "world 2 (dp 2" in log and "finished with exit code 0" in log
    # Same global batch in one process: the launch path changes nothing numerically.
    run_cli(["train", PRESET, "--run-dir", str(root / "local"), *sets(*_train_args(corpus))], cache_dir)
    local, _ = read_metrics(root / "local")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in local], abs=1e-5)
    print(f"slurm 2-task job: {seconds:.1f}s")


@pytest.mark.slurm
def test_preempted_job_saves_requeues_and_ends_like_the_uninterrupted_one(slurm_run, cache_dir, tmp_path):
    root, corpus, _ = slurm_run
    run, logs = tmp_path / "run", tmp_path / "logs"
    t0 = time.time()
    job = _submit(cache_dir, PRESET, "--nproc-per-node", "2", "--time", "00:10:00", "--log-dir", str(logs),
                  "--run-dir", str(run), *sets(*_train_args(corpus)), wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:  # let it get past its first checkpoint
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 12:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    pending_since, states = None, []
    while time.time() < deadline:
        log = next(logs.glob("*.out")).read_text()
        if "finished with exit code" in log:  # the last line of a job that ran to its end
            break
        state = _job_state(job)
        states.append(state)
        if state == "PENDING" and pending_since is None:
            pending_since = time.time()
        # Slurm holds a requeued job for about two minutes (BeginTime) so that it does not
        # restart within the second its old credential was revoked ("Job credential revoked").
        # Release it after a few seconds instead of two minutes.
        if pending_since is not None and time.time() - pending_since > 3:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            pending_since = float("inf")
        time.sleep(0.5)
    assert "finished with exit code" in log, f"job states seen: {sorted(set(map(str, states)))}\n{log}"
    assert "USR1: saving and stopping" in log and "requeueing job" in log, log
    assert "resumed from" in log and log.rstrip().endswith("finished with exit code 0"), log
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert 0 < stopped < STEPS
    rows, _ = read_metrics(run)
    ref, _ = read_metrics(root / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # bit for bit, resume included
    print(f"preempted at step {stopped}, requeued and finished in {time.time() - t0:.1f}s")


@pytest.mark.slurm
def test_job_array_of_three_runs(slurm, cache_dir, tmp_path, tiny_corpus):
    _submit(cache_dir, PRESET, "--array", "0-2", "--time", "00:10:00", "--log-dir", str(tmp_path / "logs"),
            "--run-dir", str(tmp_path / "run-%a"),
            *sets(*_train_args(tiny_corpus), "train.steps=5", "checkpoint.every=0", "train.seed=%a"))
    finals = []
    for i in range(3):
        rows, _ = read_metrics(tmp_path / f"run-{i}")
        assert rows[-1]["step"] == 5
        finals.append(rows[-1]["loss"])
    assert len(set(finals)) == 3  # three seeds, three runs
    assert len(list((tmp_path / "logs").glob("*.out"))) == 3


def test_launch_errors_are_one_line(cache_dir):
    p = run_cli(["launch", "slurm", PRESET, "--set", "train.lrr=1", "--dry-run"], cache_dir, check=False)
    assert p.returncode == 2 and "did you mean 'train.lr'" in p.stderr
    p = run_cli(["launch", "slurm", "p_%a.yaml", "--dry-run"], cache_dir, check=False)
    assert p.returncode == 2 and p.stderr.strip().endswith("no --array is given")
    p = run_cli(["launch", "slurm", PRESET, "--eval-follow", "--dry-run"], cache_dir, check=False)
    assert p.returncode == 2 and "--eval-follow follows one run: give --run-dir" in p.stderr


@pytest.mark.slurm
def test_eval_follow_job_scores_every_checkpoint_beside_training(slurm, cache_dir, tmp_path, tiny_corpus):
    """Two jobs: training (checkpoints at 10, 20, 30, 40) and a follower that starts with it,
    scores each checkpoint and ends after the run's finished.json."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    p = subprocess.run([sys.executable, "-m", "trainer", "launch", "slurm", PRESET, "--time", "00:10:00",
                        "--log-dir", str(logs), "--run-dir", str(run), "--eval-follow",
                        "--eval-every-seconds", "2", "--eval-args", "--max-tokens 2000",
                        *sets(*_train_args(tiny_corpus), "checkpoint.keep_last=null"), "--submit", "--wait"],
                       cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    train_job, eval_job = p.stdout.strip().split(";")
    rows = [json.loads(ln) for ln in (run / "eval/results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(r["settings"]["max_tokens"] == 2000 for r in rows)
    log = (logs / f"gpt-debug-eval-{eval_job}.out").read_text()
    assert f"of job {train_job}" in log and log.rstrip().endswith("finished with exit code 0"), log
    assert "one last pass" not in log


@pytest.mark.slurm
def test_prepare_array_writes_the_dataset_a_single_process_would(slurm, cache_dir, tmp_path, tiny_corpus):
    """``--prepare --parts 3``: three array tasks share the shards; the one that completes the set
    publishes the dataset, byte for byte the one a single process prepares."""
    from trainer.config import load_config
    from trainer.data.shards import prepare

    logs = tmp_path / "logs"
    settings = [f"data.source={tiny_corpus}", "data.max_bytes=null", "data.shard_bytes=3000",
                "data.tokenizer.vocab_size=300"]
    _submit(cache_dir, PRESET, "--prepare", "--parts", "3", "--cpus-per-task", "1", "--time", "00:10:00",
            "--log-dir", str(logs), *sets(*settings))
    outs = sorted(logs.glob("gpt-debug-prepare-*.out"))
    assert len(outs) == 3 and all(o.read_text().rstrip().endswith("finished with exit code 0") for o in outs)
    texts = [o.read_text() for o in outs]
    assert sum("in 10 shards" in t for t in texts) >= 1, texts  # a task published it
    assert sum("still to come from the other parts" in t for t in texts) >= 1, texts
    cfg = load_config(PRESET, settings).data
    done = prepare(cfg.model_copy(update={"cache_dir": str(cache_dir)}), log=lambda _: None)  # a cache hit
    assert done.meta["shards"] == 10
    single = prepare(cfg.model_copy(update={"cache_dir": str(tmp_path / "single")}), log=lambda _: None)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (done.dir / name).read_bytes() == (single.dir / name).read_bytes(), name
    assert not list((cache_dir / "datasets").glob(".*.partial"))
