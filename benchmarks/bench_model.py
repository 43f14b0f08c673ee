"""End-to-end model benchmark: the same Gemma-style modules on detjax kernels and on plain XLA.

Usage: ``python benchmarks/bench_model.py [--model gemma2_2b] [--batches 1,8,64] [--prompt 512]
[--new-tokens 256] [--json OUT] [--transform [--unfused]] [--skip-forward] [--skip-generate]
[--mosaic]``. ``--mosaic`` adds the same model with ``attention_kernel='mosaic'`` (a row of its own).

A batch size that fails (e.g. out of GPU memory) is reported as ``FAILED`` and skipped.

``--transform`` times only the forward pass of three versions of the same model: the modules on plain
XLA, ``detjax.deterministic`` applied to that plain-XLA forward (the jaxpr transform, untouched
model code), and the modules built on ``detjax.nn`` kernels; ``--unfused`` adds the transform with
its fused patterns off (``fuse=False``).

Forward: device-side time (CUPTI via ``profiler.measure`` on a GPU) of one jitted forward pass over
``[batch, prompt]`` tokens, median of ``--iters``. Generation: wall-clock time of a call of
``detjax.generate``, median of ``--gen-iters`` calls after the one that compiles, greedy,
synchronised at the end (the loop runs on the device, no host sync per token). Random weights from a fixed seed; random prompts.
Ratio = XLA time / detjax time (> 1: detjax faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from benchmarks.bench_kernels import device_ms  # noqa: E402
from detjax.generate import generate  # noqa: E402
from detjax.models.gemma import GemmaConfig, Transformer  # noqa: E402


def forward_fn(model):
    graphdef, state = nnx.split(model)

    def fwd(state, tokens):
        return nnx.merge(graphdef, state)(tokens)
    return fwd, state


def run(model_name, batches, prompt, new_tokens, iters, forward=True, generation=True, gen_iters=3,
        upcast=False, mosaic=False):
    config = getattr(GemmaConfig, model_name)(upcast_activations_to_float32=upcast)
    rows = []
    models = {impl: Transformer(config, rngs=nnx.Rngs(0), impl=impl) for impl in ("xla", "detjax")}
    if mosaic:   # the same weights, attention through the Mosaic GPU kernel
        models["mosaic"] = Transformer(config.replace(attention_kernel="mosaic"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for b in batches:
        tokens = jnp.asarray(rng.integers(1, config.vocab_size, size=(b, prompt)), jnp.int32)
        prompts = [list(map(int, t)) for t in np.asarray(tokens)]
        res = {}
        try:
            for impl, model in models.items():
                fwd_ms = float("nan")
                if forward:
                    fwd, state = forward_fn(model)
                    fwd_ms = device_ms(fwd, state, tokens, iters=iters)
                gen_s, n_gen = float("nan"), 0
                if generation:
                    max_len = -(-(prompt + new_tokens) // 64) * 64
                    out = generate(model, prompts, new_tokens, max_len=max_len)  # compile
                    times = []
                    for _ in range(gen_iters):
                        t = time.perf_counter()
                        out = generate(model, prompts, new_tokens, max_len=max_len)
                        times.append(time.perf_counter() - t)
                    gen_s = float(np.median(times))
                    n_gen = sum(len(x) for x in out.tokens)
                res[impl] = (fwd_ms, gen_s, n_gen)
        except Exception as e:  # noqa: BLE001 - report the batch size that failed (e.g. out of memory)
            print(f"{model_name} B={b:3d} FAILED ({impl}): {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        fx, gx, nx = res["xla"]
        for impl in [i for i in res if i != "xla"]:
            fd, gd, nd = res[impl]
            rows.append(dict(model=model_name, upcast=upcast, batch=b, prompt=prompt,
                             new_tokens=new_tokens, attention="mosaic" if impl == "mosaic" else "triton",
                             fwd_xla_ms=fx, fwd_detjax_ms=fd, fwd_ratio=fx / fd,
                             fwd_tok_s_detjax=b * prompt / fd * 1e3,
                             gen_xla_s=gx, gen_detjax_s=gd, gen_ratio=gx / gd,
                             gen_tok_s_detjax=nd / gd))
            r = rows[-1]
            print(f"{model_name} B={b:3d} forward xla {fx:8.2f} ms {impl} {fd:8.2f} ms ratio "
                  f"{fx / fd:5.2f} | generate xla {gx:7.2f} s {impl} {gd:7.2f} s ratio {gx / gd:5.2f} "
                  f"({r['gen_tok_s_detjax']:.0f} tok/s)", flush=True)
    return rows


def run_transform(model_name, batches, prompt, iters, upcast=False, unfused=False):
    from detjax.transform import deterministic
    config = getattr(GemmaConfig, model_name)(upcast_activations_to_float32=upcast)
    rows = []
    fx, sx = forward_fn(Transformer(config, rngs=nnx.Rngs(0), impl="xla"))
    fd, sd = forward_fn(Transformer(config, rngs=nnx.Rngs(0), impl="detjax"))
    ft = deterministic(fx)
    rng = np.random.default_rng(0)
    for b in batches:
        tokens = jnp.asarray(rng.integers(1, config.vocab_size, size=(b, prompt)), jnp.int32)
        t_x = device_ms(fx, sx, tokens, iters=iters)
        t_t = device_ms(ft, sx, tokens, iters=iters)
        t_d = device_ms(fd, sd, tokens, iters=iters)
        t_u = device_ms(deterministic(fx, fuse=False), sx, tokens, iters=iters) if unfused \
            else float("nan")
        rows.append(dict(model=model_name, upcast=upcast, batch=b, prompt=prompt, fwd_xla_ms=t_x,
                         fwd_transform_ms=t_t, fwd_nn_ms=t_d, transform_vs_nn=t_t / t_d,
                         xla_over_transform=t_x / t_t, fwd_transform_unfused_ms=t_u))
        print(f"{model_name} B={b:3d} forward xla {t_x:8.2f} ms  deterministic(xla model) {t_t:8.2f} ms  "
              f"detjax.nn {t_d:8.2f} ms  transform/nn {t_t / t_d:5.3f}  ratio vs XLA {t_x / t_t:5.2f}"
              + (f"  (fuse=False {t_u:8.2f} ms)" if unfused else ""), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gemma2_2b")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--transform", action="store_true", help="forward only: XLA vs deterministic(XLA) vs nn")
    p.add_argument("--unfused", action="store_true",
                   help="with --transform: also time deterministic(..., fuse=False)")
    p.add_argument("--skip-forward", action="store_true",
                   help="time generation only (the forward pass returns [B, prompt, vocab] logits: "
                        "large at batch 64)")
    p.add_argument("--skip-generate", action="store_true", help="time the forward pass only")
    p.add_argument("--upcast", action="store_true",
                   help="upcast_activations_to_float32=True (bf16 weights, float32 activations)")
    p.add_argument("--mosaic", action="store_true",
                   help="also time the model with attention_kernel='mosaic' (Hopper GPUs)")
    p.add_argument("--gen-iters", type=int, default=3,
                   help="timed generation calls after the compiling one (median; run s7-14 saw the "
                        "first timed call of a process 1.6x slower than the next)")
    args = p.parse_args(argv)
    if args.transform:
        rows = run_transform(args.model, [int(b) for b in args.batches.split(",")], args.prompt, args.iters,
                             upcast=args.upcast, unfused=args.unfused)
    else:
        rows = run(args.model, [int(b) for b in args.batches.split(",")], args.prompt,
                   args.new_tokens, args.iters, forward=not args.skip_forward,
                   generation=not args.skip_generate, gen_iters=args.gen_iters, upcast=args.upcast,
                   mosaic=args.mosaic)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=jax.devices()[0].device_kind,
                                                   jax=jax.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
