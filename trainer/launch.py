"""``seqtrain launch slurm|torchrun``: render (and submit or run) the launch of a training job.

The scripts only ever call the CLI (``python -m trainer train ...``) on every node; which
backend (NCCL or gloo) and accelerator to use is decided there, so the same script serves GPU
and CPU nodes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import SeqtrainError

TEMPLATE = Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch"
EVAL_TEMPLATE = TEMPLATE.with_name("eval_follow.sbatch")
PREPARE_TEMPLATE = TEMPLATE.with_name("prepare.sbatch")


@dataclass
class SlurmJob:
    config: str
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    array: str | None = None
    job_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None
    log_dir: str = "logs"
    signal_seconds: int = 120
    max_restarts: int = 0
    workdir: str = field(default_factory=os.getcwd)
    python: str = sys.executable
    eval_follow: bool = False
    """Also submit ``seqtrain eval RUN --follow`` as a job of its own beside training."""
    eval_args: list[str] = field(default_factory=list)
    """Arguments for that ``seqtrain eval`` (``--tasks hellaswag --limit 500``)."""
    eval_every_seconds: int = 60
    prepare_parts: int | None = None
    """Instead of training: prepare the config's data as a job array of this many parts
    (``seqtrain data prepare --part i/N``)."""

    def validate(self) -> None:
        for name in ("nodes", "signal_seconds"):
            if getattr(self, name) < 1:
                raise SeqtrainError(f"--{name.replace('_', '-')} must be at least 1")
        if self.gpus_per_node < 0:
            raise SeqtrainError("--gpus-per-node must be 0 (CPU nodes) or more")
        if "%a" in " ".join([self.config, *self.overrides, self.run_dir or ""]) and not self.array:
            raise SeqtrainError("'%a' (the array index) is used but no --array is given")
        if self.prepare_parts is not None and (self.prepare_parts < 1 or self.array or self.eval_follow
                                               or self.run_dir or self.nodes != 1):
            raise SeqtrainError("--prepare takes --parts N (N >= 1, the array it submits) and none of --array, "
                                "--eval-follow, --run-dir, --nodes")
        if self.eval_follow and (not self.run_dir or self.array):
            raise SeqtrainError("--eval-follow follows one run: give --run-dir, and no --array "
                                "(per array task, run `seqtrain eval RUN --follow` yourself)")

    @property
    def name(self) -> str:
        return self.job_name or Path(self.config).stem.replace("%a", "")

    def _fill(self, template: Path, fields: dict[str, str]) -> str:
        text = template.read_text()
        for key, value in fields.items():
            text = text.replace(f"@@{key}@@", value)
        return text

    def _extra(self, gpus: bool) -> str:
        extra = [f"#SBATCH --gpus-per-node={self.gpus_per_node}"] if gpus and self.gpus_per_node else []
        for opt in ("partition", "account", "qos", *(("array",) if gpus else ())):
            if getattr(self, opt):
                extra.append(f"#SBATCH --{opt}={getattr(self, opt)}")
        return "\n".join(extra)

    def render_eval(self) -> str:
        """The follower's batch script (its first argument: the training job's id)."""
        self.validate()
        return self._fill(EVAL_TEMPLATE, {
            "JOB_NAME": self.name, "CPUS_PER_TASK": str(self.cpus_per_task or 4), "TIME": self.time,
            "LOG_DIR": shlex.quote(str(Path(self.log_dir).absolute())), "SBATCH_EXTRA": self._extra(gpus=False),
            "WORKDIR": shlex.quote(self.workdir), "PYTHON": shlex.quote(self.python),
            "RUN_DIR": shlex.quote(str(self.run_dir)), "EVERY_SECONDS": str(self.eval_every_seconds),
            "EVAL_ARGS": " ".join(shlex.quote(a) for a in self.eval_args)})

    @property
    def procs(self) -> int:
        """Processes per node: one per GPU, or ``--nproc-per-node`` on CPU nodes."""
        return self.nproc_per_node or self.gpus_per_node or 1

    def render_prepare(self) -> str:
        """The data preparation array's batch script."""
        self.validate()
        args = [self.config, *(a for o in self.overrides for a in ("--set", o))]
        return self._fill(PREPARE_TEMPLATE, {
            "JOB_NAME": self.name, "CPUS_PER_TASK": str(self.cpus_per_task or 1), "TIME": self.time,
            "PARTS": str(self.prepare_parts), "LAST_PART": str(self.prepare_parts - 1),
            "LOG_DIR": shlex.quote(str(Path(self.log_dir).absolute())), "SBATCH_EXTRA": self._extra(gpus=False),
            "WORKDIR": shlex.quote(self.workdir), "PYTHON": shlex.quote(self.python),
            "ARGS": " ".join(shlex.quote(a) for a in args)})

    def render(self) -> str:
        if self.prepare_parts is not None:
            return self.render_prepare()
        self.validate()
        args = ["train", self.config, *(a for o in self.overrides for a in ("--set", o))]
        if self.run_dir:
            args += ["--run-dir", self.run_dir]
        return self._fill(TEMPLATE, {
            "JOB_NAME": self.name,
            "NODES": str(self.nodes),
            "CPUS_PER_TASK": str(self.cpus_per_task or max(1, self.procs) * (8 if self.gpus_per_node else 1)),
            "TIME": self.time,
            "LOG_DIR": shlex.quote(str(Path(self.log_dir).absolute())),
            "LOG_NAME": "%x-%A_%a" if self.array else "%x-%j",
            "SIGNAL_SECONDS": str(self.signal_seconds),
            "SBATCH_EXTRA": self._extra(gpus=True),
            "WORKDIR": shlex.quote(self.workdir),
            "PYTHON": shlex.quote(self.python),
            "NPROC_PER_NODE": str(self.procs),
            "MAX_RESTARTS": str(self.max_restarts),
            "ARGS": " ".join(shlex.quote(a) for a in args),
        })

    def submit(self, wait: bool = False) -> str:
        """Write the script(s) next to the logs and ``sbatch`` them; returns the job id(s),
        ``;``-separated (training first). With ``wait``, returns when every job has ended."""
        log_dir = Path(self.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the output folder
        path = log_dir / f"{self.name}.sbatch"
        path.write_text(self.render())
        if not self.eval_follow:
            return _sbatch([*(["--wait"] if wait else []), str(path)])
        train_job = _sbatch([str(path)]).split(";")[0]
        eval_path = log_dir / f"{self.name}-eval.sbatch"
        eval_path.write_text(self.render_eval())
        eval_job = _sbatch([f"--dependency=after:{train_job}", *(["--wait"] if wait else []),
                            str(eval_path), train_job])
        return f"{train_job};{eval_job}"


def _sbatch(args: list[str]) -> str:
    try:
        p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise SeqtrainError("sbatch not found: is this a Slurm login node?") from None
    if p.returncode != 0:
        raise SeqtrainError(f"sbatch {' '.join(args)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def torchrun(nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
             master_port: int = 29500, max_restarts: int | None = None,
             python: str = sys.executable) -> list[str]:
    """torchrun's arguments for one node, up to the module to run: standalone rendezvous on
    one node, static (``master_addr:master_port``) on several."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if max_restarts is not None:
        cmd.append(f"--max_restarts={max_restarts}")
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}"]
    return cmd


def python_launcher(nproc: int) -> list[str]:
    """How to start a module with ``nproc`` processes on this node: the interpreter itself for
    one, torchrun for several."""
    return torchrun(nproc) if nproc > 1 else [sys.executable]


def torchrun_command(config: str, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = 29500,
                     overrides: list[str] = (), run_dir: str | None = None,
                     max_restarts: int = 0, python: str = sys.executable) -> list[str]:
    """The ``seqtrain train`` torchrun command for one node."""
    cmd = torchrun(nproc_per_node, nnodes, node_rank, master_addr, master_port, max_restarts, python)
    cmd += ["-m", "trainer", "train", config, *(a for o in overrides for a in ("--set", o))]
    if run_dir:
        cmd += ["--run-dir", run_dir]
    return cmd
