"""Snapshot a model's full state to prove a method (or a failure) left it exactly as it was."""

import torch


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(getattr(m, "_backward_pre_hooks", {})))
                  for k, m in model.named_modules()},
        "attn": getattr(model.config, "_attn_implementation", None),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key in before["params"]:
        assert torch.equal(after["params"][key], before["params"][key]), key
    for key in ("requires_grad", "grads", "training", "hooks", "attn"):
        if key == "grads":
            assert all(v is None for v in after["grads"].values()) == all(
                v is None for v in before["grads"].values())
            continue
        assert after[key] == before[key], key
