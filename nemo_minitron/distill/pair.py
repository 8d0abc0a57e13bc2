"""Teacher and student as one pipeline-parallel module.

Both models are split over the same TP and PP ranks, so the teacher's layers run on the same stages as the
student's. Between stages the two hidden states travel as one tensor ``[s, b, h_student + h_teacher]``
(megatron's schedules send one tensor per micro-batch; the send/receive shapes are widened with
:func:`pipeline_shapes`). The teacher part carries no gradient. On the last stage both models stop before
their output layer: the loss projects the final hidden states onto the vocabulary chunk by chunk, so the
full ``tokens x vocab`` logits never exist.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nemo_minitron.parallel import state


def _hidden_instead_of_logits(model) -> None:
    """Make a last-stage GPTModel return its final-norm hidden states [b, s, h] instead of logits; under
    sequence parallelism gathered over TP, every token on every rank, as the output layer would gather them."""
    if not state.is_last_stage():
        return
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # The loss sums each rank's partial gradient of the hidden states over TP itself (it is computed from
        # one slice of the vocabulary per rank, FusedLogitKD), so the backward of the gather only keeps this
        # rank's tokens: a reduce-scatter would count the gradient TP times.
        model.output_layer.forward = lambda hidden, *args, **kwargs: (
            gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False), None)
    else:
        model.output_layer.forward = lambda hidden, *args, **kwargs: (hidden, None)


def _logits_again(model) -> None:
    """Undo :func:`_hidden_instead_of_logits` (the instance attribute shadows the class's ``forward``)."""
    if state.is_last_stage():
        model.output_layer.__dict__.pop("forward", None)


def output_weight(model) -> torch.Tensor:
    """This TP rank's vocabulary projection [V/tp, h] (the embedding itself when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


class AttachAuxLoss(torch.autograd.Function):
    """Return ``output`` unchanged; in backward also send gradient ``scale`` into ``aux_loss``.

    Losses computed on a middle pipeline stage (intermediate states) cannot join the last stage's loss;
    this routes their gradient through the backward pass of the tensor that stage sends on.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class DistillationPair(nn.Module):
    """``forward(input_ids, position_ids, mask)`` of student and (frozen) teacher on this stage.

    Non-last stages return the concatenated hidden states to send on. The last stage returns the student's
    final hidden states [b, s, h_s] and leaves the teacher's in ``teacher_hidden`` for the loss.
    ``teacher`` may be None (CE training of a single model, e.g. teacher correction).
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.config = student.config  # megatron's schedules read the model config from here
        for model in (student, teacher):
            if model is not None:
                _hidden_instead_of_logits(model)
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.h_student = student.config.hidden_size
        self.h_teacher = teacher.config.hidden_size if teacher is not None else 0
        self.teacher_hidden: Optional[torch.Tensor] = None

    def restore(self) -> None:
        """Both models return logits again."""
        for model in (self.student, self.teacher):
            if model is not None:
                _logits_again(model)

    def set_input_tensor(self, tensor) -> None:
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        if tensor is None or self.teacher is None:
            self.student.set_input_tensor(tensor)
            return
        self.student.set_input_tensor(tensor[..., : self.h_student])
        teacher_dtype = next(self.teacher.parameters()).dtype
        self.teacher.set_input_tensor(tensor[..., self.h_student :].detach().to(teacher_dtype))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        student_out = self.student(input_ids, position_ids, attention_mask)
        if state.is_last_stage():
            self.teacher_hidden = teacher_out
            return student_out
        if teacher_out is None:
            return student_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)


def pipeline_shapes(pair: DistillationPair):
    """``adjust_tensor_shapes_fn`` for megatron's 1F1B schedule: send/receive both hidden states."""

    def adjust(recv_shapes, send_shapes):
        def widen(shapes):
            return [(s, b, pair.h_student + pair.h_teacher) for (s, b, _h) in shapes]

        return widen(recv_shapes), widen(send_shapes)

    return adjust
