"""Compare the LoRA family in federation: one Hydra sweep per member, 3 seeds.

Each member runs through the real launcher (``python -m simulations.run -m``) into
one sweep directory, then ``simulations.report`` groups the jobs by setting and
this writes the table and every run's final metrics as JSON. Members:

- ``lora``: the defaults;
- ``lora_plus``: ``adapter.lr_ratio_b=16`` (the LoRA+ paper's starting ratio);
- ``dora``: ``adapter.use_dora=true`` (QDoRA on the NF4 base);
- ``vera``: ``adapter.peft_type=vera`` as its paper runs it: rank 256 (the shared
  projections are not sent, so the rank costs no bytes) and ten times the
  learning rate, with the head's ratio divided by ten so the head keeps its rate;
- ``pissa`` and ``loftq``: ``adapter.init`` (QPiSSA: the residual quantised).

Tasks: ``default`` (the default job: MiniLM NF4, synthetic 4-class, 8 clients,
7 rounds x 20 steps) and ``sst2`` (SST-2 from a local copy, ``--sst2 DIR`` with
``train.tsv`` / ``test.tsv``; the README's best federated recipe: Dirichlet(0.5),
20 rounds x 5 steps, head ratio 3, logit adjustment)::

    python -m benchmarks.family_sweep --task default [--members lora vera ...]

``--report-only`` writes the report of the sweep directory as it is (members run
separately, or a sweep stopped part way).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result

SEEDS = "0,1,2"


def members(task: str) -> dict[str, list[str]]:
    """Member -> its overrides on ``task`` (the head keeps its absolute rate)."""
    head = 3.0 if task == "sst2" else 30.0
    lr = 2e-3
    return {
        "lora": [],
        "lora_plus": ["adapter.lr_ratio_b=16"],
        "dora": ["adapter.use_dora=true"],
        "vera": [
            "adapter.peft_type=vera",
            "adapter.rank=256",
            f"train.lr={10 * lr:g}",
            f"adapter.lr_ratio_head={head / 10:g}",
        ],
        "pissa": ["adapter.init=pissa"],
        "loftq": ["adapter.init=loftq"],
    }


def task_overrides(task: str, sst2: Path | None) -> list[str]:
    """Overrides every member of ``task`` shares."""
    if task == "default":
        return []
    if sst2 is None:
        raise SystemExit("--task sst2 needs --sst2 DIR (train.tsv, test.tsv)")
    return [
        "data=local",
        f"data.path={sst2 / 'train.tsv'}",
        "data.text_column=sentence",
        "data.num_classes=2",
        f"data.test_path={sst2 / 'test.tsv'}",
        "federation.min_clients=1",
        "federation.rounds=20",
        "federation.local_steps=5",
        "adapter.lr_ratio_head=3",
        "train.logit_adjustment=1",
    ]


def run_member(sweep: Path, shared: list[str], own: list[str]) -> float:
    """Run one member's seeds into ``sweep``; return the wall seconds.

    The shared overrides are left out of the job folders' names (a member's
    folder is named after its own overrides; the lora member's is the sweep's
    ``seed=N`` folders).
    """
    hidden = ["seed", *(o.split("=", 1)[0] for o in shared)]
    cmd = [
        sys.executable, "-m", "simulations.run", "-m",
        *shared, *own, f"seed={SEEDS}", f"hydra.sweep.dir={sweep}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(hidden)}]",
    ]  # fmt: skip
    started = time.perf_counter()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.family_sweep")
    parser.add_argument("--task", choices=("default", "sst2"), default="default")
    parser.add_argument("--sst2", type=Path, default=None)
    parser.add_argument("--members", nargs="+", default=None)
    parser.add_argument("--sweep-dir", type=Path, default=None)
    parser.add_argument(
        "--report-only", action="store_true", help="report the sweep dir as it is"
    )
    parser.add_argument("--out", type=str, default=None, help="result file")
    args = parser.parse_args(argv)
    from simulations.report import find_jobs, summarize, to_markdown

    table = members(args.task)
    chosen = args.members or list(table)
    sweep = args.sweep_dir or Path("multirun") / f"lora-family-{args.task}"
    shared = task_overrides(args.task, args.sst2)
    seconds = {}
    if not args.report_only:
        seconds = {m: run_member(sweep, shared, table[m]) for m in chosen}
    jobs = find_jobs(sweep)
    result: dict[str, Any] = {
        "task": args.task,
        "shared_overrides": shared,
        "members": {m: table[m] for m in chosen},
        "seeds": SEEDS,
        "wall_seconds": seconds,
        "report": to_markdown(summarize(jobs)),
        "runs": [
            {
                "setting": j.setting,
                "seed": j.seed,
                "final": j.final,
                "accuracy_by_round": [r.get("eval_accuracy") for r in j.rows],
            }
            for j in jobs
        ],
    }
    print(result["report"])
    print(json.dumps(seconds))
    write_result(
        "family_sweep",
        time.strftime("%Y%m%d-%H%M%S"),
        result,
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
