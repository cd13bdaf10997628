"""A small model and optimizer with real state, for restore tests (needs torch)."""

from __future__ import annotations

from typing import Any


def trained_mlp() -> tuple[Any, Any, dict[str, Any], dict[Any, Any]]:
    """A two-layer model (its first weight 1200 x 1200: 5.8 MB) after one Adam step:
    ``(model, optimizer, copies of its parameters, copies of Adam's exp_avg)``."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1200, 1200), torch.nn.Linear(1200, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1200)).sum().backward()
    opt.step()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    return model, opt, params, moments
