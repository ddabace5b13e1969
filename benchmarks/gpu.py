"""The CUDA path measured: QLoRA memory and step time on a 1.1B Llama, DP-SGD's cost,
and a two-site deployment whose sites train on the GPU.

Stages, each in a fresh subprocess with its own time cap (a failure is recorded and
the next stage runs; ``results.json`` is rewritten after every stage):

``env``
    versions, the GPU, and a bitsandbytes NF4 quantise/dequantise round trip.
``build``
    a Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
    vocab 32000) with random weights from a config, saved in bfloat16, so the
    project's loader reads it as a local directory.
``bench_nf4`` / ``bench_bf16`` / ``bench_nf4_dp``
    the project's own ``load_base_model`` + ``wrap_lora`` (r=16, all linear layers)
    and its training step on batches of 4 x 512 tokens: ``train_local`` for NF4
    (bfloat16 compute, double quantisation) and for an unquantised bfloat16 base,
    ``DPTrainer`` (Opacus per-sample clipping + noise) for NF4 with DP-SGD. Peak GPU
    memory after loading and while training, seconds per step after warm-up.
``e2e``
    two sites through real Flower processes (TLS SuperLink, SuperNode auth,
    ``flwr run``), node-config ``device=cuda``, the tiny_llama preset, 2 rounds.

Usage::

    python -m benchmarks.gpu --out DIR              # on a CUDA machine
    python -m benchmarks.gpu --smoke --out DIR      # CPU, tiny shapes (the test suite)

Only the standard library is imported in the driver process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# TinyLlama-1.1B's shape; batch 4 x 512 tokens, LoRA r=16 on every linear layer.
GPU_SHAPE: dict[str, Any] = {
    "device": "cuda", "hidden": 2048, "inter": 5632, "layers": 22, "heads": 32,
    "kv": 4, "vocab": 32000, "batch": 4, "seq": 512, "steps": 10, "warmup": 2,
    "rank": 16, "alpha": 32.0, "e2e_local_steps": 10, "e2e_timeout": 240,
}  # fmt: skip
SMOKE_SHAPE: dict[str, Any] = {
    "device": "cpu", "hidden": 64, "inter": 128, "layers": 2, "heads": 4, "kv": 2,
    "vocab": 512, "batch": 2, "seq": 16, "steps": 2, "warmup": 1, "rank": 4,
    "alpha": 8.0, "e2e_local_steps": 2, "e2e_timeout": 300,
}  # fmt: skip
# variant -> (quantization, DP-SGD, gradient checkpointing)
BENCH_VARIANTS = {
    "nf4": ("nf4", False, False),
    "bf16": ("none", False, False),
    "nf4_dp": ("nf4", True, False),
    "nf4_gc": ("nf4", False, True),
    "bf16_gc": ("none", False, True),
}
STAGES = (
    "env", "build", "bench_nf4", "bench_bf16", "bench_nf4_dp", "bench_nf4_gc",
    "bench_bf16_gc", "e2e",
)  # fmt: skip


def gib(n: float) -> float:
    """Bytes to GiB, 3 decimals."""
    return round(n / 2**30, 3)


def model_dir(shape: dict[str, Any], work: Path) -> Path:
    """Where ``build`` saves the random Llama of this shape."""
    return work / f"llama-h{shape['hidden']}-l{shape['layers']}-v{shape['vocab']}"


# --------------------------------------------------------------------- stages
def stage_env(shape: dict[str, Any], work: Path) -> dict[str, Any]:
    """Versions, the device, and an NF4 round trip through bitsandbytes."""
    import bitsandbytes as bnb
    import flwr
    import opacus
    import peft
    import torch
    import transformers

    res: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb.__version__,
        "opacus": opacus.__version__,
        "flwr": flwr.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    device = torch.device(shape["device"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        res["gpu"] = props.name
        res["gpu_memory_gib"] = gib(props.total_memory)
        res["capability"] = f"{props.major}.{props.minor}"
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    q, state = quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    err = (dequantize_4bit(q, state) - x).abs().mean() / x.abs().mean()
    res["nf4_roundtrip_rel_error"] = round(float(err), 4)
    return res


def stage_build(shape: dict[str, Any], work: Path) -> dict[str, Any]:
    """A randomly initialised Llama of ``shape``, saved in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = model_dir(shape, work)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"],
        intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(shape["device"]):
        model = LlamaForCausalLM(config)
    model = model.bfloat16()
    model.save_pretrained(target)
    return {
        "dir": str(target),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - start, 2),
        "disk_gib": gib(
            sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        ),
    }


def stage_bench(shape: dict[str, Any], work: Path, variant: str) -> dict[str, Any]:
    """Load, wrap and train through the project's functions; time and memory."""
    import torch

    from fedlora.config import AdapterConfig, ModelConfig, TrainConfig
    from fedlora.models import load_base_model, wrap_lora
    from fedlora.train import to_device, train_local

    quantization, private, checkpointing = BENCH_VARIANTS[variant]
    device = torch.device(shape["device"])
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak() -> float | None:
        return gib(torch.cuda.max_memory_allocated()) if cuda else None

    model_cfg = ModelConfig(
        name=str(model_dir(shape, work)), quantization=quantization,
        compute_dtype="bfloat16" if cuda else "float32", double_quant=True,
        device=device.type, gradient_checkpointing=checkpointing,
    )  # fmt: skip
    adapter = AdapterConfig(
        rank=shape["rank"], alpha=shape["alpha"], target_modules=("all-linear",)
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    base = load_base_model(model_cfg, task="causal_lm", num_labels=0, seed=0)
    model = wrap_lora(base, model_cfg, adapter, task="causal_lm", seed=0)
    sync()
    res: dict[str, Any] = {
        "variant": variant,
        "quantization": quantization,
        "compute_dtype": model_cfg.compute_dtype,
        "dp": private,
        "gradient_checkpointing": checkpointing,
        "batch": shape["batch"],
        "seq": shape["seq"],
        "rank": shape["rank"],
        "load_s": round(time.perf_counter() - start, 2),
        "peak_gib_after_load": peak(),
        "trainable_params": sum(
            p.numel() for p in model.parameters() if p.requires_grad
        ),
        "linear4bit_layers": sum(  # bitsandbytes' layers, not peft's wrappers
            type(m).__module__.startswith("bitsandbytes")
            and type(m).__name__ == "Linear4bit"
            for m in model.modules()
        ),
    }
    gen = torch.Generator().manual_seed(0)
    n_data = 8 * shape["batch"]
    ids = torch.randint(3, shape["vocab"], (n_data, shape["seq"]), generator=gen)
    data = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
        for x in ids
    ]

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    losses: list[float] = []
    if private:
        from fedlora.dp import DPSettings, DPTrainer, PrivacyLedger

        b = shape["batch"]
        settings = DPSettings(
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=b / n_data,
            delta=1e-5, accountant="rdp", expected_batch_size=b,
        )  # fmt: skip
        ledger = PrivacyLedger("rdp", 1e-5)
        trainer = DPTrainer(
            model, settings=settings, ledger=ledger, lr=2e-4, weight_decay=0.0
        )
        res["path"] = "DPTrainer.step on fixed batches of b (timing; not Poisson)"
        position = [0]

        def run(steps: int) -> None:
            for _ in range(steps):
                i = position[0] % (n_data // b)
                position[0] += 1
                batch = to_device(collate(data[i * b : (i + 1) * b]), device)
                losses.append(trainer.step(batch, task="causal_lm"))

    else:
        train_cfg = TrainConfig(lr=2e-4, batch_size=shape["batch"], max_grad_norm=1.0)
        res["path"] = "train_local (AdamW, clip 1.0)"

        def run(steps: int) -> None:
            out = train_local(
                model, data, collate,  # type: ignore[arg-type]  # a list is a Dataset
                cfg=train_cfg, steps=steps, start_step=0,
                total_steps=steps, generator=gen, device=device,
            )  # fmt: skip
            losses.append(out.loss)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(shape["warmup"])
    sync()
    res["warmup_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    run(shape["steps"])
    sync()
    elapsed = time.perf_counter() - start
    res["s_per_step"] = round(elapsed / shape["steps"], 4)
    res["tokens_per_s"] = round(
        shape["steps"] * shape["batch"] * shape["seq"] / elapsed
    )
    res["peak_gib_training"] = peak()
    res["losses_finite"] = all(x == x and abs(x) != float("inf") for x in losses)
    if private:
        res["dp_epsilon"] = round(ledger.epsilon(), 3)
        trainer.detach()
    return res


def stage_e2e(shape: dict[str, Any], work: Path) -> dict[str, Any]:
    """Two sites with node-config device=<shape device>, 2 rounds through Flower."""
    from fedlora.config.flat import build_config
    from fedlora.data import instruct
    from simulations.deployment import LocalDeployment
    from simulations.experiment import write_run_config
    from strategies.config import ExperimentConfig

    run_dir = work / "e2e-run"
    files = {}
    for name, seed, n in (("server", 9, 60), ("site-0", 0, 120), ("site-1", 1, 120)):
        files[name] = work / f"e2e-{name}.jsonl"
        instruct.generate(n, seed).to_json(str(files[name]))
    cfg = build_config(
        ExperimentConfig,
        {
            "model.name": "tiny_llama", "model.tiny_hidden_size": 64,
            "model.device": shape["device"], "data.source": "local",
            "data.path": str(files["server"]), "data.task": "causal_lm",
            "data.partitioner": "iid", "federation.clients": 2,
            "federation.rounds": 2, "federation.local_steps": shape["e2e_local_steps"],
            "train.batch_size": 4, "output_dir": str(run_dir),
        },
    )  # fmt: skip
    run_config = work / "e2e-run.toml"
    write_run_config(cfg, run_config)
    res: dict[str, Any] = {"site_device": shape["device"]}
    start = time.perf_counter()
    deploy = LocalDeployment(work / "e2e-deploy", sites=2)
    with deploy:
        for site in (0, 1):
            deploy.register(site)
            deploy.start_site(
                site,
                f"data-path='{files[f'site-{site}']}' state-dir='{work}/e2e-s{site}' "
                f"device='{shape['device']}'",
            )
        done = deploy.run(ROOT, run_config, timeout=shape["e2e_timeout"])
    res["returncode"] = done.returncode
    res["seconds"] = round(time.perf_counter() - start, 2)
    res["leftover_processes"] = len(deploy.leftovers())
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(x) for x in lines]
    keys = ("round", "clients", "clients_dropped", "round_applied", "eval_perplexity")
    res["rounds"] = [{k: r.get(k) for k in keys} for r in rows]
    if done.returncode != 0 or len(rows) < 3:
        res["stdout_tail"] = done.stdout[-2000:]
        res["stderr_tail"] = done.stderr[-2000:]
        for log in sorted((work / "e2e-deploy").glob("*.log")):
            res[f"log_{log.name}"] = log.read_text(errors="replace")[-1500:]
    return res


def run_stage(name: str, shape: dict[str, Any], work: Path) -> dict[str, Any]:
    """Dispatch one stage (runs inside the stage's own subprocess)."""
    if name.startswith("bench_"):
        return stage_bench(shape, work, name.removeprefix("bench_"))
    return {"env": stage_env, "build": stage_build, "e2e": stage_e2e}[name](shape, work)


# --------------------------------------------------------------------- driver
def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios side by side: NF4 vs bfloat16 base, DP-SGD vs plain NF4 steps."""
    stages = results["stages"]

    def value(stage: str, key: str) -> Any:
        rec = stages.get(stage, {})
        return rec.get("result", {}).get(key) if rec.get("status") == "ok" else None

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "nf4_s_per_step": value("bench_nf4", "s_per_step"),
        "bf16_s_per_step": value("bench_bf16", "s_per_step"),
        "nf4_dp_s_per_step": value("bench_nf4_dp", "s_per_step"),
        "nf4_peak_gib": value("bench_nf4", "peak_gib_training"),
        "bf16_peak_gib": value("bench_bf16", "peak_gib_training"),
        "nf4_dp_peak_gib": value("bench_nf4_dp", "peak_gib_training"),
        "nf4_gc_peak_gib": value("bench_nf4_gc", "peak_gib_training"),
        "bf16_gc_peak_gib": value("bench_bf16_gc", "peak_gib_training"),
        "nf4_gc_s_per_step": value("bench_nf4_gc", "s_per_step"),
        "bf16_gc_s_per_step": value("bench_bf16_gc", "s_per_step"),
        "nf4_over_bf16_time": ratio(
            value("bench_nf4", "s_per_step"), value("bench_bf16", "s_per_step")
        ),
        "nf4_over_bf16_peak_memory": ratio(
            value("bench_nf4", "peak_gib_training"),
            value("bench_bf16", "peak_gib_training"),
        ),
        "nf4_gc_over_bf16_gc_peak_memory": ratio(
            value("bench_nf4_gc", "peak_gib_training"),
            value("bench_bf16_gc", "peak_gib_training"),
        ),
        "dp_over_nf4_time": ratio(
            value("bench_nf4_dp", "s_per_step"), value("bench_nf4", "s_per_step")
        ),
        "e2e_ok": value("e2e", "returncode") == 0,
    }


def drive(args: argparse.Namespace) -> int:
    """Run the stages one by one in subprocesses; write results after each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prefixes = [p for p in args.only.split(",") if p]
    wanted = [
        s for s in STAGES if not prefixes or any(s.startswith(p) for p in prefixes)
    ]
    results: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "stages": {}}
    deadline = time.monotonic() + args.budget
    for name in wanted:
        left = deadline - time.monotonic()
        if left < 20:
            results["stages"][name] = {"status": "skipped", "reason": "budget spent"}
            continue
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu",
            "--stage",
            name,
            "--work",
            str(work),
        ]
        cmd += ["--smoke"] if args.smoke else []
        start = time.monotonic()
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=left
            )
            rec: dict[str, Any] = {"seconds": round(time.monotonic() - start, 1)}
            marker = "@@RESULT@@"
            lines = [x for x in done.stdout.splitlines() if x.startswith(marker)]
            if done.returncode == 0 and lines:
                rec.update(status="ok", result=json.loads(lines[-1][len(marker) :]))
            else:
                rec.update(status="failed", returncode=done.returncode)
                rec["stderr_tail"] = done.stderr[-3000:]
        except subprocess.TimeoutExpired:
            rec = {"status": "timeout", "seconds": round(time.monotonic() - start, 1)}
        results["stages"][name] = rec
        results["summary"] = summarize(results)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[gpu] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
    print(json.dumps(results.get("summary", {}), indent=2))
    return 0 if all(r["status"] == "ok" for r in results["stages"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    work = os.environ.get("FEDLORA_GPU_WORK", "/tmp/fedlora-gpu")
    parser.add_argument("--work", default=work, help="model and deployment files")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--only", default="", help="comma list of stage-name prefixes")
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds, all stages"
    )
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
        try:
            res = run_stage(args.stage, shape, Path(args.work))
        except Exception:
            traceback.print_exc()
            return 1
        print("@@RESULT@@" + json.dumps(res), flush=True)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
