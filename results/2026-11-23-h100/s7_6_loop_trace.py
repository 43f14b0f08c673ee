"""Decode loop of gemma2_2b at B8: ms/step per impl, and (with --trace) a perfetto trace of one
loop call parsed for GPU busy time vs span and the largest idle gaps (which kernel precedes them)."""
import sys, time, json, gzip, glob, os, collections, re
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, ".")
from detjax.models.gemma import GemmaConfig, Transformer

B, CACHE, STEPS = 8, int(os.environ.get("CACHE", 512)), 32
trace = "--trace" in sys.argv
impls = [a for a in sys.argv[1:] if not a.startswith("--")] or ["xla", "detjax"]
cfg = getattr(GemmaConfig, os.environ.get("MODEL", "gemma2_2b"))()
print("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""), flush=True)
for impl in impls:
    model = Transformer(cfg, rngs=nnx.Rngs(0), impl=impl)
    graphdef, state = nnx.split(model)
    max_len = CACHE + STEPS + 64
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(B, CACHE)), jnp.int32)

    @jax.jit
    def prefill(state, prompt):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(B, max_len)
        _, cache = m.prefill(prompt, jnp.full((B,), CACHE, jnp.int32), cache)
        return cache

    @jax.jit
    def loop(state, tok, cache):
        def body(_, c):
            tok, cache = c
            logits, cache = nnx.merge(graphdef, state).decode_step(tok, cache)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache
        return jax.lax.fori_loop(0, STEPS, body, (tok, cache))
    cache = prefill(state, prompt)
    tok = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(B, 1)), jnp.int32)
    jax.block_until_ready(loop(state, tok, cache))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(loop(state, tok, cache)); ts.append(time.perf_counter() - t0)
    print(f"{impl}: loop {min(ts) / STEPS * 1e3:.3f} ms/step (min of 5)", flush=True)
    if trace:
        d = f"/tmp/trace_{impl}"
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(loop(state, tok, cache))
        f = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        if not f:
            print("no trace file", glob.glob(f"{d}/**/*", recursive=True)); continue
        ev = json.load(gzip.open(f[0]))
        ev = ev["traceEvents"] if isinstance(ev, dict) else ev
        # GPU kernel events: complete events on a device "stream" track
        pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
        gpu = [p for p, n in pids.items() if "/device:GPU" in n]
        tids = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
        ks = [e for e in ev if e.get("ph") == "X" and e.get("pid") in gpu]
        streams = collections.Counter(tids.get((e["pid"], e["tid"]), "?") for e in ks)
        print("  tracks:", dict(streams.most_common(6)))
        # keep the track with the most kernel events
        if not streams:
            print("  no GPU tracks; processes:", list(pids.values())[:10]); continue
        top = streams.most_common(1)[0][0]
        ks = sorted([e for e in ks if tids.get((e["pid"], e["tid"])) == top], key=lambda e: e["ts"])
        span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
        busy = sum(e["dur"] for e in ks)
        gaps = collections.defaultdict(lambda: [0, 0.0])
        for a, b in zip(ks, ks[1:]):
            g = b["ts"] - (a["ts"] + a["dur"])
            key = re.sub(r"([._]\d+)+$", "", a["name"].split("(")[0])[:40] + " -> " + re.sub(r"([._]\d+)+$", "", b["name"].split("(")[0])[:40]
            gaps[key][0] += 1; gaps[key][1] += max(g, 0)
        print(f"  {len(ks)} kernels ({len(ks)/STEPS:.0f}/step), span {span/1e3:.2f} ms, busy {busy/1e3:.2f} ms, idle {(span-busy)/1e3:.2f} ms "
              f"= {(span-busy)/STEPS:.0f} us/step")
        for k, (n, g) in sorted(gaps.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"    gap {g/STEPS:7.1f} us/step {n/STEPS:5.1f}x/step  {k}")
        busyk = collections.defaultdict(float)
        for e in ks:
            busyk[re.sub(r"([._]\d+)+$", "", e["name"].split("(")[0])[:50]] += e["dur"]
        for k, t in sorted(busyk.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    busy {t/STEPS:7.1f} us/step  {k}")
    del model, state, cache
