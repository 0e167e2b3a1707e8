"""Throughput of exported models (onnxruntime) beside torch, on the CPU, for every regressor.

Every model is built from its default config (``mrflight/configs/model/<name>.yaml``) for the
default train (1750 time points; speed does not depend on the weights), wrapped in
:class:`mrflight.regressor.MRFRegressor`, exported with :func:`mrflight.export.export_onnx` and
timed on the same raw magnitude fingerprints (preprocessing included on both sides):

* torch: ``module.predict_parameters(x)`` (chunks of 256);
* onnxruntime: ``session.run`` on the whole batch, and in chunks of 256;

both with one intra-op thread (the project's default on a shared 2-core machine) and, with
``--threads 2``, two. Median of repeats after a warm-up; ratio = onnxruntime / torch signals/s.

Usage::

    python benchmarks/export_speed.py            # all four models, 4096 signals
    python benchmarks/export_speed.py --quick    # ANN and GRU, fewer repeats

Prints a markdown table and writes ``benchmarks/results/export_speed.md``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import fmt_rate, machine_line, markdown_table, publish, timeit
from inference_speed import default_net

MODELS = ("lstm", "gru", "ann", "cnn")


def measure(models=MODELS, n: int = 4096, threads: int = 1, repeats: int = 5,
            input_length: int = 1750) -> list[dict]:
    import onnxruntime as ort

    from mrflight.export import export_onnx
    from mrflight.regressor import MRFRegressor

    torch.set_num_threads(threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            module = MRFRegressor(default_net(name, input_length)).eval()
            path = export_onnx(module, Path(tmp) / f"{name}.onnx")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            x = torch.rand(n, input_length) * 1e-3 + 1e-4
            xn = x.numpy()
            t_torch = timeit(lambda m=module, x=x: m.predict_parameters(x), repeats=repeats)
            t_ort = timeit(lambda s=sess, xn=xn: s.run(None, {"fingerprints": xn}),
                           repeats=repeats)
            t_ort_chunk = timeit(lambda s=sess, xn=xn: [
                s.run(None, {"fingerprints": xn[i:i + 256]}) for i in range(0, n, 256)],
                repeats=repeats)
            ref = module.predict_parameters(x).numpy()
            out = sess.run(None, {"fingerprints": xn})[0]
            rows.append({"model": name, "torch": n / t_torch, "ort": n / t_ort,
                         "ort_chunked": n / t_ort_chunk,
                         "max_rel_diff": float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))})
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=4096)
    a = p.parse_args(argv)
    models = ("ann", "gru") if a.quick else MODELS
    rows = measure(models, n=a.n, threads=a.threads, repeats=3 if a.quick else 7)
    table = markdown_table(
        ["model", "torch predict_parameters (signals/s)", "onnxruntime, one call",
         "onnxruntime, chunks of 256", "ratio (best onnxruntime / torch)",
         "max difference / max output"],
        [[r["model"], fmt_rate(r["torch"]), fmt_rate(r["ort"]), fmt_rate(r["ort_chunked"]),
          f"{max(r['ort'], r['ort_chunked']) / r['torch']:.2f}x", f"{r['max_rel_diff']:.1e}"]
         for r in rows])
    text = (f"# Exported models: onnxruntime vs torch\n\n- {machine_line()}\n- {a.n} raw "
            f"magnitude fingerprints of 1750 points, {a.threads} thread(s), preprocessing "
            f"included\n\n{table}\n")
    return publish("export_speed.md", text)


if __name__ == "__main__":
    main()
