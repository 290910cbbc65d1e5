"""``python -m dfm_fused``: reference vs dfm_fused on a small DFM training step (time and graph memory)."""
from __future__ import annotations

import statistics
import time

import torch

import dfm_fused
from dfm_fused import reference


class _SmallDFMStep(torch.nn.Module):
    """Feedback concat -> two convs -> GroupNorm + decay + residual, on a 64-channel state."""

    def __init__(self, cx=32, fb=16, c=64, literal=False):
        super().__init__()
        self.cx, self.fb, self.c, self.literal = cx, fb, c, literal
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(cx + fb, c, 3, padding=1, stride=2),
            torch.nn.BatchNorm2d(c),
            torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 3, padding=1),
        )
        self.update = dfm_fused.StateUpdate(c, 8, tau=1.0)

    def forward(self, x, h, t):
        off = self.c - self.fb
        u = self.update
        if self.literal:
            y = self.body(reference.feedback_input(x, h, off, self.fb, 8))
            if u.training and t == 0:
                u.reorthogonalize(u.Q)
            return reference.state_update(h, y, u.Q, u.S, u.T * t, u.tau, u.alpha, 8)
        return u(h, self.body(dfm_fused.feedback_input(x, h, off, self.fb, 8)), t)


def _graph_bytes_and_time(run, repeats=5):
    storages, times = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in range(repeats + 1):
        start = time.perf_counter()
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = run()
        else:
            loss = run()
        loss.backward()
        if i:
            times.append(time.perf_counter() - start)
    return sum(storages.values()), statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    B, H = 8, 32
    x = torch.randn(B, 32, H, H)
    h0 = 1e-3 * torch.randn(B, 64, H // 2, H // 2)
    fused, literal = _SmallDFMStep(), _SmallDFMStep(literal=True)
    literal.load_state_dict(fused.state_dict())
    print(f"dfm_fused {dfm_fused.__version__}: small DFM training step, B={B}, x {tuple(x.shape[1:])}, "
          f"state {tuple(h0.shape[1:])}, backend for cpu: {dfm_fused._dispatch.resolve('state_update', 'cpu')[0]}")
    print(f"{'T':>3} {'variant':<28} {'time ms':>9} {'graph MB':>9} {'speed-up':>9} {'memory':>8}")
    for T in (1, 4, 8):
        def reference_loop():
            h = h0
            for t in range(T):
                h = literal(x, h, t)
            return h.square().mean()

        ref_bytes, ref_time = _graph_bytes_and_time(reference_loop)
        rows = [("reference (plain graph)", ref_bytes, ref_time)]
        for checkpoint in (False, True):
            run = lambda: dfm_fused.unroll(fused, x, h0, T, checkpoint=checkpoint).square().mean()  # noqa: E731
            label = "dfm_fused, memory saving" if checkpoint else "dfm_fused, plain graph"
            rows.append((label, *_graph_bytes_and_time(run)))
        for label, nbytes, seconds in rows:
            print(f"{T:>3} {label:<28} {seconds * 1e3:9.2f} {nbytes / 2**20:9.2f} "
                  f"{ref_time / seconds:8.2f}x {nbytes / ref_bytes:7.2f}x")


if __name__ == "__main__":
    main()
