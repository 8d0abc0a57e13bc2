"""AdamW on fp32 master weights for a model that computes in bf16 (or fp32).

Like megatron's mixed-precision optimizer: every trainable parameter gets an fp32 ``main_grad`` into which
each micro-batch's gradient is accumulated as soon as autograd produces it (so accumulation over many
micro-batches does not round in bf16), and the optimizer updates fp32 master copies that are then copied
back into the model's parameters. For fp32 parameters the master is the parameter itself.
"""

from __future__ import annotations

import torch


class MixedPrecisionAdamW:
    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]
        self.hooks = []
        for p in params:
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)  # on the parameter's device
            self.hooks.append(p.register_post_accumulate_grad_hook(self._accumulate))
        # The fused kernel (CPU and CUDA) updates all tensors in one pass: several times faster than the loop.
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           fused=True)

    @staticmethod
    def _accumulate(param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None

    def remove_hooks(self) -> None:
        """Detach from the parameters (their gradients go to ``.grad`` again); the optimizer is unusable after."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for p in self.params:
            del p.main_grad

    def zero_grad(self) -> None:
        torch._foreach_zero_([p.main_grad for p in self.params])
        for p in self.params:
            p.grad = None

    def scale_grads(self, factor: float) -> None:
        torch._foreach_mul_([p.main_grad for p in self.params], factor)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p, master in zip(self.params, self.masters):
            master.grad = p.main_grad
        self.optimizer.step()
        low_precision = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        with torch.no_grad():
            if low_precision:
                torch._foreach_copy_([p for p, _ in low_precision], [m for _, m in low_precision])
        for master in self.masters:
            master.grad = None

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "masters": [m.detach().clone() for m, p in zip(self.masters, self.params) if m is not p],
        }

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        low_precision = [(m, p) for m, p in zip(self.masters, self.params) if m is not p]
        with torch.no_grad():
            for (master, p), saved in zip(low_precision, sd["masters"]):
                master.copy_(saved)
                p.copy_(saved)
