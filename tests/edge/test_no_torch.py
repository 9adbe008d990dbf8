"""The edge package imports and runs inference in a process where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from converters.commands import export_split_dir
from split.graph import split_model
from split.store import save_split
from split.zoo import build_model

# Runs in the child: torch is made unimportable before anything else is imported.
_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None
    import numpy as np
    import edge, edge.runtime, edge.commands
    directory, x_path, out_path = sys.argv[1:4]
    x = np.load(x_path)
    result = {}
    for variant in ("fp32", "int8"):
        model = edge.EdgeModel.from_dir(directory, variant=variant, threads=1)
        np.save(out_path + "." + variant + ".npy", model.run(x))
        result[variant + "_hash"] = model.model_hash
    try:
        edge.commands.infer(directory, x)
    except RuntimeError as exc:
        result["infer_error"] = str(exc)
    from converters.cli import main
    result["cli_code"] = main(["infer", directory, x_path])
    result["torch_blocked"] = sys.modules.get("torch", "absent") is None
    result["heavy"] = sorted(m for m in ("torch", "onnx", "onnxscript", "sklearn")
                             if sys.modules.get(m) is not None)
    print(json.dumps(result))
    """
)


def test_edge_runs_without_torch(tmp_path, rng):
    model, spec = build_model("digits-cnn", seed=5)
    model.eval()
    sm = split_model(model, cut=spec.default_cut, example_input=torch.zeros(2, *spec.input_shape))
    split_dir = tmp_path / "split"
    save_split(sm, model, model_ref="digits-cnn", num_classes=10, out_dir=split_dir)
    export_split_dir(split_dir, quantize=["int8"], data="digits")
    x = rng.uniform(0, 1, size=(6, *spec.input_shape)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        want = sm.edge(torch.from_numpy(x)).numpy()

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(split_dir),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_blocked"] and result["heavy"] == []
    np.testing.assert_allclose(np.load(tmp_path / "y.fp32.npy"), want, atol=1e-4, rtol=0)
    int8 = np.load(tmp_path / "y.int8.npy")
    assert np.linalg.norm(int8 - want) / np.linalg.norm(want) < 0.1
    assert "cloud half needs torch" in result["infer_error"]
    assert "\n" not in result["infer_error"]
    # The CLI reports the same as a one-line error with exit code 2.
    assert result["cli_code"] == 2
    assert "cloud half needs torch" in proc.stderr


def test_import_edge_is_lazy():
    code = (
        "import sys; sys.modules['torch'] = None; import edge, edge.commands; "
        "print(sorted(m for m in ('onnxruntime', 'paho', 'torch', 'sklearn') "
        "if sys.modules.get(m) is not None))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
