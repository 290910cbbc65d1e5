"""Make tests/golden/resnet18_dfm_small.pt: the real reference ResNet18 DFM run on seeded weights.

The reference is ``dfbmodels`` (DCalhas/deep_feedback_models on GitHub), imported from a
checkout whose path is the first argument; nothing of it is copied into this repository. Its
ResNet needs torchvision (for the ResNet base class and blocks) and imports
segmentation_models_pytorch only for its DeepLab model, which this script replaces with a stub
that refuses to build. Its ``torch.compile``d layers are unwrapped, so it runs eagerly.

Setup, in a scratch environment that borrows the dev environment's torch (2.14.1) and adds the
matching torchvision without its dependencies:

    python3 -m venv /tmp/golden-venv
    .venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \\
        > "$(/tmp/golden-venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/dev.pth"
    /tmp/golden-venv/bin/pip install --no-deps torchvision==0.29.1
    # a dfbmodels checkout in /tmp/dfbmodels (git clone of DCalhas/deep_feedback_models)

Run from the repository root (a minute or two on 2 CPU cores):

    /tmp/golden-venv/bin/python scripts/make_golden.py /tmp/dfbmodels

What it does: fills the weights with the recipe of ``tests/golden/recipe.py`` (integer hashing,
the same bits on every host; the file keeps the key list and a SHA-256, not the weights), loads
them into the reference ``ResNet18(fb_filters=16, n_classes=10, shape=(64, 64), tau=1.0)``, and
for each case runs ``forward(x, T, atol)`` from the recorded initial state ``h0``, then
``(logits * w).sum().backward()``, once in float32 and once in float64 (the same weights and
inputs, cast). It stores the logits, final state, five gradients and the BatchNorm / error-head
tensors after the run, the float64 answer, and the float32 run's relative 2-norm error against
it. The cases and the file's layout are those of the shared ``resnet18_dfm.pt``
(``tests/_golden.py`` turns the stored file back into that layout).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import types

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.golden import recipe  # noqa: E402

CONFIG = {"fb_filters": 16, "n_classes": 10, "shape": (64, 64), "tau": 1.0}
# The shared golden file's cases: a training run (QR at step 0, BatchNorm batch statistics and
# running-statistic updates) and an eval run, both with the reference's default early-stop atol.
CASES = [
    {"batch": 2, "T": 3, "training": True, "atol": 1e-2},
    {"batch": 2, "T": 2, "training": False, "atol": 1e-2},
]
GRADS = ["conv1.weight", "layer1.0.conv1.weight", "fc.weight", "fc.bias", "error_head.Q"]
AFTER = ["bn1.running_mean", "bn1.running_var", "layer1.0.bn1.running_mean", "layer4.1.bn2.running_var", "error_head.Q"]
COMPILED = ["layer1", "layer2", "layer3", "layer4", "frontend"]
# A float64 gradient stored as factors must reproduce the run to this (float64 rounding).
FLOAT64_PACKING_TOL = 1e-12


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return (actual - expected).norm().item() / expected.norm().item()


def import_reference(checkout: pathlib.Path):
    """``dfbmodels.models.resnet.ResNet18`` from ``checkout``, with the DeepLab dependency stubbed."""
    if not (checkout / "dfbmodels" / "models" / "resnet.py").is_file():
        raise SystemExit(f"dfbmodels: expected a checkout holding dfbmodels/models/resnet.py; got {checkout}")
    stub = types.ModuleType("segmentation_models_pytorch")

    class DeepLabV3(torch.nn.Module):
        """Stands in as dfbmodels' DeepLab base class; the ResNet path never builds it."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("segmentation_models_pytorch is stubbed: only the ResNet models can be built")

    stub.DeepLabV3 = DeepLabV3
    sys.modules["segmentation_models_pytorch"] = stub
    sys.path.insert(0, str(checkout))
    from dfbmodels.models.resnet import ResNet18

    return ResNet18


def build_reference(ResNet18, weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """The reference with ``weights`` loaded (strict: the key list must be the reference's own),
    its compiled layers unwrapped, cast to ``dtype``."""
    model = ResNet18(**CONFIG)
    model.load_state_dict(weights, strict=True)
    for name in COMPILED:
        setattr(model, name, getattr(model, name)._orig_mod)
    # The reference's own ``to`` takes a device only; ``double`` casts parameters and buffers.
    return model.double() if dtype == torch.float64 else model


def run_case(model, case: dict, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """One forward and backward of the reference; the results in the golden file's layout."""
    h0 = inputs["h0"].to(dtype)

    def init_from_h0(self, x):  # replaces the reference's N(0, 1e-3) draw
        self.state = h0.clone()

    model._init_states = types.MethodType(init_from_h0, model)
    model.train(case["training"])
    logits = model(inputs["x"].to(dtype), case["T"], atol=case["atol"])
    (logits * inputs["w"].to(dtype)).sum().backward()
    params, buffers = dict(model.named_parameters()), model.state_dict()
    assert all(params[name].grad is not None for name in GRADS), "a recorded gradient is missing"
    return {
        "steps_run": int(model.T.item()),  # the reference counts its steps in T (reset by forward)
        "logits": logits.detach().clone(),
        "final_state": model.state.detach().clone(),
        "grads": {name: params[name].grad.detach().clone() for name in GRADS},
        "after": {name: buffers[name].detach().clone() for name in AFTER},
    }


def low_rank(tensor: torch.Tensor, rank: int) -> dict:
    """``tensor`` as float64 factors (left @ right.T) of the given rank."""
    u, s, vh = torch.linalg.svd(tensor.double(), full_matrices=False)
    factors = ((u[:, :rank] * s[:rank]).contiguous(), vh[:rank].T.contiguous())
    return {"low_rank": factors, "dtype": str(tensor.dtype).split(".")[-1]}


def numerical_rank(tensor: torch.Tensor) -> int:
    s = torch.linalg.svdvals(tensor.double())
    return int((s > s[0] * 1e-13).sum())


def make_case(ResNet18, weights, index: int, case: dict) -> dict:
    b = case["batch"]
    shape_hw = CONFIG["shape"]
    state_shape = (b, 512 + CONFIG["fb_filters"], shape_hw[0] // 32, shape_hw[1] // 32)
    sqrt3 = math.sqrt(3)
    inputs = {  # uniform with std 1 (x, w) and 1e-3 (h0, as the reference's draw)
        "x": recipe.uniform(f"cases.{index}.x", (b, 3, *shape_hw), -sqrt3, sqrt3).float(),
        "h0": recipe.uniform(f"cases.{index}.h0", state_shape, -1e-3 * sqrt3, 1e-3 * sqrt3).float(),
        "w": recipe.uniform(f"cases.{index}.w", (b, CONFIG["n_classes"]), -sqrt3, sqrt3).float(),
    }
    run32 = run_case(build_reference(ResNet18, weights, torch.float32), case, inputs, torch.float32)
    run64 = run_case(build_reference(ResNet18, weights, torch.float64), case, inputs, torch.float64)
    if run32["steps_run"] != run64["steps_run"]:
        raise RuntimeError(f"case {index}: float32 ran {run32['steps_run']} steps, float64 {run64['steps_run']}")
    errors = {"logits": rel_err(run32["logits"], run64["logits"]),
              "final_state": rel_err(run32["final_state"], run64["final_state"])}
    errors.update({f"grads.{n}": rel_err(run32["grads"][n], run64["grads"][n]) for n in GRADS})

    # Storage (see tests/golden/recipe.py): the error head's gradients as factors of the float64
    # gradient's rank; the error head after an eval run is the weights' own.
    rank = numerical_rank(run64["grads"]["error_head.Q"])
    packed64 = low_rank(run64["grads"]["error_head.Q"], rank)
    packed32 = low_rank(run32["grads"]["error_head.Q"], rank)
    packing_error = {
        "float64.grads.error_head.Q": rel_err(recipe.unpack(packed64, {}), run64["grads"]["error_head.Q"]),
        "grads.error_head.Q": rel_err(recipe.unpack(packed32, {}), run32["grads"]["error_head.Q"]),
    }
    if not packing_error["float64.grads.error_head.Q"] <= FLOAT64_PACKING_TOL:
        raise RuntimeError(f"case {index}: rank-{rank} factors miss the float64 gradient: {packing_error}")
    if not packing_error["grads.error_head.Q"] <= errors["grads.error_head.Q"] / 4:
        raise RuntimeError(f"case {index}: rank-{rank} factors of the float32 gradient are not well below "
                           f"its own error against float64: {packing_error} vs {errors}")
    after = dict(run32["after"])
    if torch.equal(after["error_head.Q"], weights["error_head.Q"]):
        after["error_head.Q"] = {"same_as_weight": "error_head.Q"}
    print(f"case {index}: training={case['training']} T={case['T']} steps_run={run32['steps_run']} "
          f"error-head gradient rank {rank}; float32 error " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return {
        **inputs,
        "T": case["T"], "training": case["training"], "atol": case["atol"], "steps_run": run32["steps_run"],
        "logits": run32["logits"], "final_state": run32["final_state"],
        "grads": {**run32["grads"], "error_head.Q": packed32},
        "after": after,
        "float64": {"logits": run64["logits"], "final_state": run64["final_state"],
                    "grads": {**run64["grads"], "error_head.Q": packed64}},
        "float32_error": errors,
        "packing_error": packing_error,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dfbmodels", type=pathlib.Path, help="path to a dfbmodels checkout")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "tests" / "golden" / "resnet18_dfm_small.pt")
    parser.add_argument("--reference-commit", default="", help="the checkout's commit, recorded in the file")
    args = parser.parse_args(argv)
    ResNet18 = import_reference(args.dfbmodels.resolve())
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    keys = ResNet18(**CONFIG).state_dict()  # the reference's names, shapes and dtypes, in its order
    entries = [(name, tuple(t.shape), str(t.dtype).split(".")[-1]) for name, t in keys.items()]
    weights = recipe.fill_state_dict(entries, CONFIG["tau"])
    golden = {
        "config": CONFIG,
        "recipe": {"seed": recipe.SEED, "entries": entries, "sha256": recipe.digest(weights)},
        "cases": [make_case(ResNet18, weights, i, case) for i, case in enumerate(CASES)],
        "versions": {"torch": str(torch.__version__), "dfbmodels": args.reference_commit or "unrecorded"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(golden, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
