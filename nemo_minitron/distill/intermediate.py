"""Intermediate-state distillation: chosen student layer outputs matched to teacher layer outputs.

``L = L_logits + w * L_is`` with ``L_is`` the mean over the pairs (Minitron §3). With ``balancing: dynamic``
each pair's term is scaled by ``L_logits / L_pair`` (a constant for autograd), so that no term dominates as
their magnitudes drift apart. Two choices make every pipeline layout train exactly as PP = 1: the scale is per
pair, so a stage needs only its own pairs' losses; and ``L_logits`` is the *previous* step's logit loss (the
mean over its micro-batches, the same number on every rank), since a stage before the last computes its pairs
before the last stage knows the current one. The first step, which has no previous step, uses the fixed weight.

Under sequence parallelism a layer's output on a TP rank holds only that rank's ``s/tp`` tokens. Each rank's
pair loss is the mean over its own tokens; as every rank holds as many tokens, the mean of these means over
TP is the mean over all tokens, the value at TP = 1. Each rank's tokens then carry ``1/tp`` of the gradient,
and a projection's gradient on one rank covers its tokens only: the projections are marked
``sequence_parallel`` like the norms, so that their gradients are summed over TP
(by megatron's ``finalize_model_grads``, see :mod:`nemo_minitron.parallel.engine`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nemo_minitron.distill.config import IntermediateConfig
from nemo_minitron.distill.pair import DistillationPair
from nemo_minitron.parallel import state


class IntermediateStateLoss(nn.Module):
    """Distance between chosen student and teacher layer outputs, mean over ``cfg.pairs``.

    One learned ``nn.Linear(h_s, h_t, bias=False)`` per pair maps the student state to the teacher's width when
    the widths differ (identity otherwise). Computed in fp32: the projections are fp32 parameters. A config
    without pairs builds an empty module (e.g. a pipeline stage that holds none of the paired layers); it has
    nothing to compute.
    """

    def __init__(self, cfg: IntermediateConfig, student_hidden_size: int, teacher_hidden_size: int,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.sequence_parallel = sequence_parallel
        self.projections = nn.ModuleList(
            nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)
            if student_hidden_size != teacher_hidden_size
            else nn.Identity()
            for _ in cfg.pairs
        )
        for weight in self.parameters():
            setattr(weight, "sequence_parallel", sequence_parallel)

    def forward(self, student_states: list[Tensor], teacher_states: list[Tensor]) -> Tensor:
        """Scalar loss: the mean over pairs of :meth:`per_pair`."""
        return self.per_pair(student_states, teacher_states).mean()

    def per_pair(self, student_states: list[Tensor], teacher_states: list[Tensor]) -> Tensor:
        """[pairs] losses; ``student_states[i]`` [s, b, h_s] and ``teacher_states[i]`` [s, b, h_t] are the outputs
        of ``cfg.pairs[i]``'s student and teacher layers (one entry per pair, in the pairs' order).

        cosine: 1 - cos(proj(student), teacher) along the hidden size, mean over the s*b tokens; mse: mean
        squared error over all elements. The teacher states are detached. With ``sequence_parallel`` the states
        are this TP rank's ``s/tp`` tokens and the means are averaged over TP (see the module docstring).
        """
        n = len(self.cfg.pairs)
        if n == 0 or len(student_states) != n or len(teacher_states) != n:
            raise ValueError(
                f"need one student and one teacher state per pair ({n} pairs), got {len(student_states)} "
                f"and {len(teacher_states)}"
            )
        losses = []
        for proj, student, teacher in zip(self.projections, student_states, teacher_states):
            s = proj(student.float())
            t = teacher.detach().float()
            if self.cfg.loss == "cosine":
                losses.append(1 - F.cosine_similarity(s, t, dim=-1).mean())
            else:
                losses.append(F.mse_loss(s, t))
        if not self.sequence_parallel:
            return torch.stack(losses)
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        # Forward: the sum over TP of mean / tp; backward: each rank's mean gets 1/tp of the gradient.
        return reduce_from_tensor_model_parallel_region(torch.stack(losses) / state.tp_size())


def balance_weight(cfg: IntermediateConfig, previous_logit_loss: Optional[float], is_loss: float) -> float:
    """The factor of one pair's loss ``is_loss`` in the loss: ``weight``, times ``previous_logit_loss / is_loss``
    when dynamic (and a previous step exists). A pair loss of exactly 0 keeps the factor finite."""
    if cfg.balancing == "fixed" or previous_logit_loss is None:
        return cfg.weight
    return cfg.weight * previous_logit_loss / max(is_loss, torch.finfo(torch.float32).tiny)


class IntermediateLosses:
    """Collects the configured layers' outputs on this pipeline stage and turns them into its intermediate loss.

    A stage holds only some of the pairs; its share of the loss is ``fraction`` (local pairs / all pairs) of
    the mean over its pairs, so the shares of all stages add up to the mean over all pairs whatever the
    pipeline layout. Each pair's projection is initialised from ``seed`` and the pair's index alone, so it is
    the same at every TP / PP layout. :meth:`remove` takes the forward hooks off the models again.
    """

    def __init__(self, pair: DistillationPair, cfg: IntermediateConfig, seed: int) -> None:
        self.cfg = cfg
        local = {layer.layer_number - 1: layer for layer in pair.student.decoder.layers}
        t_local = {layer.layer_number - 1: layer for layer in pair.teacher.decoder.layers}
        indices = [i for i, p in enumerate(cfg.pairs) if p.student_layer in local]
        self.indices = indices  # of this stage's pairs in cfg.pairs
        self.pairs = [(cfg.pairs[i].student_layer, cfg.pairs[i].teacher_layer) for i in indices]
        self.fraction = len(indices) / len(cfg.pairs)
        self.states: dict[tuple[str, int], Tensor] = {}
        self.module = IntermediateStateLoss(
            cfg.model_copy(update={"pairs": [cfg.pairs[i] for i in indices]}),
            pair.h_student,
            pair.h_teacher,
            pair.student.config.sequence_parallel,
        )
        for index, projection in zip(indices, self.module.projections):
            if isinstance(projection, nn.Linear):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + index)
                    projection.reset_parameters()
        self.module.to(next(pair.student.parameters()).device)
        self.handles = []
        for s, t in self.pairs:
            self.handles.append(local[s].register_forward_hook(self._keep("student", s)))
            self.handles.append(t_local[t].register_forward_hook(self._keep("teacher", t)))

    def _keep(self, side: str, index: int) -> Callable:
        def hook(_module, _args, output):
            self.states[(side, index)] = output[0]

        return hook

    def loss(self, previous_logit_loss: Optional[float]) -> Optional[tuple[Tensor, Tensor]]:
        """(mean of this stage's pair losses, their balanced mean: the term to add to the loss), None without
        pairs; the caller weights both by ``fraction``."""
        if not self.pairs:
            return None
        # A layer may appear in several pairs: read every state, then forget them all.
        student = [self.states[("student", s)] for s, _ in self.pairs]
        teacher = [self.states[("teacher", t)].detach() for _, t in self.pairs]
        self.states.clear()
        losses = self.module.per_pair(student, teacher)
        weights = [balance_weight(self.cfg, previous_logit_loss, value) for value in losses.detach().tolist()]
        balanced = (losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)).mean()
        return losses.mean(), balanced

    def sharded_state_dict(self) -> dict:
        """This stage's projection weights for a training checkpoint, named by their pair's index in the config
        (so they load at any pipeline layout); replicated over TP and DP."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        replica = (0, state.tp_rank(), state.dp_rank())
        return {f"pair{index}": ShardedTensor.from_rank_offsets(f"intermediate.pair{index}.weight", proj.weight,
                                                                 replica_id=replica)
                for index, proj in zip(self.indices, self.module.projections) if isinstance(proj, nn.Linear)}

    def load_sharded(self, loaded: dict) -> None:
        with torch.no_grad():
            for index, proj in zip(self.indices, self.module.projections):
                if isinstance(proj, nn.Linear):
                    proj.weight.copy_(loaded[f"pair{index}"])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.states.clear()
