"""Reading prepared splits: shuffled fixed-length training batches (of one prepared dataset or a weighted blend)
and in-order held-out eval windows (per component of a blend)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from megatron.core.datasets import helpers
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import PreTrainedTokenizerBase

from nemo_minitron.data.blend import prepared_components
from nemo_minitron.data.config import BlendComponent
from nemo_minitron.data.prepare import read_text
from nemo_minitron.errors import UserError


class TokenDataset:
    """One prepared split (``{prefix}.bin/.idx``) as a single flat token stream.

    ``tokens`` is a read-only numpy view ``[num_tokens]`` over the memory-mapped ``.bin`` file (uint16 or
    int32); documents follow one another, each ending with EOS.
    """

    def __init__(self, prefix: str) -> None:
        if not IndexedDataset.exists(prefix):
            raise UserError(f"{prefix}.bin/.idx: prepared data not found (run prepare-data first)")
        self.prefix = prefix
        self._indexed = IndexedDataset(prefix)
        # prepare_data writes documents back to back from offset 0, so the whole .bin is the stream.
        count, dtype = int(self._indexed.sequence_lengths.sum()), self._indexed.index.dtype
        self.tokens: np.ndarray = self._indexed.bin_reader.read(dtype=dtype, count=count, offset=0)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self._indexed)


class _Batches(abc.ABC):
    """Data-parallel batches over a global order of samples that a subclass defines with :meth:`sample`.

    A global batch is ``batch_size * dp_size`` consecutive samples of the global order and rank ``dp_rank``
    takes the ``dp_rank``-th run of ``batch_size`` of them, so the ranks' batches partition the global batch.
    All ranks therefore share one counter of consumed samples, ``steps * batch_size * dp_size``, which is what
    :meth:`batches` resumes from.
    """

    batch_size: int
    dp_rank: int
    dp_size: int

    @abc.abstractmethod
    def sample(self, index: int) -> np.ndarray:
        """Sample ``index`` of the global order: ``seq_length + 1`` tokens."""

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size

    def batches(self, start_sample: int = 0) -> Iterator[torch.Tensor]:
        """Endless int64 batches ``[batch_size, seq_length + 1]`` for this rank.

        ``start_sample`` is the global count of samples already consumed (all ranks together); starting
        there yields exactly the batches an uninterrupted iteration would yield from that point on.
        """
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        first = start_sample + self.dp_rank * self.batch_size
        while True:
            rows = [self.sample(first + j) for j in range(self.batch_size)]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))
            first += self.global_batch_size


def _check_shape(seq_length: int, batch_size: int, dp_rank: int, dp_size: int) -> None:
    if seq_length < 1 or batch_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad sampler shape: {seq_length=} {batch_size=} {dp_rank=} {dp_size=}")


class SequenceSampler(_Batches):
    """Deterministic, resumable, data-parallel training batches of ``seq_length + 1`` tokens per sample.

    The stream is cut into ``num_samples = (num_tokens - 1) // seq_length`` samples; sample ``i`` is
    ``tokens[i * seq_length : (i + 1) * seq_length + 1]``, so neighbours share one token and a sample's
    inputs / labels are ``sample[:-1]`` / ``sample[1:]``. Epoch ``e`` visits every sample once, in the order
    of ``numpy.random.default_rng([seed, e]).permutation(num_samples)``; the epochs follow one another into
    one endless *global order*.

    Data parallelism and resuming: see :class:`_Batches`.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        seq_length: int,
        batch_size: int,
        seed: int = 1234,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        _check_shape(seq_length, batch_size, dp_rank, dp_size)
        self.num_samples = (dataset.num_tokens - 1) // seq_length
        if self.num_samples < 1:
            raise UserError(
                f"{dataset.prefix}: {dataset.num_tokens} tokens, fewer than one sample of seq_length + 1 = "
                f"{seq_length + 1}"
            )
        self.dataset, self.seq_length, self.batch_size, self.seed = dataset, seq_length, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def sample(self, index: int) -> np.ndarray:
        """Tokens ``[seq_length + 1]`` of the ``index``-th sample of the global order (a view, not a copy)."""
        epoch, position = divmod(index, self.num_samples)
        if epoch != self._epoch:  # one permutation cached: batches walk the order forward
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        start = int(self._order[position]) * self.seq_length
        return self.dataset.tokens[start : start + self.seq_length + 1]


def _component_seed(seed: int, component: int) -> int:
    """The shuffling seed of a blend's ``component``: independent streams, one per component."""
    return int(np.random.SeedSequence([seed, component]).generate_state(1)[0])


class BlendedSampler(_Batches):
    """Deterministic, resumable, data-parallel training batches from a weighted blend of prepared datasets.

    The global order follows Megatron's ``BlendedDataset``: position ``i`` goes to the component whose share so
    far lags its weight most (``argmax_c weight_c * max(i, 1) - taken_c``, the lowest index on a tie), computed
    by megatron-core's own ``build_blending_indices``, and takes that component's next sample. After any
    ``n`` samples every component has had ``weight_c * n`` of them to within a sample or two. Each component
    walks its own endless order, that of a :class:`SequenceSampler` with seed ``SeedSequence([seed, c])``,
    through as many of its epochs as its share needs. Data parallelism and resuming: see :class:`_Batches`.
    """

    def __init__(
        self,
        datasets: Sequence[TokenDataset],
        weights: Sequence[float],
        seq_length: int,
        batch_size: int,
        seed: int = 1234,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        _check_shape(seq_length, batch_size, dp_rank, dp_size)
        if len(datasets) != len(weights) or not datasets or min(weights) <= 0:
            raise ValueError(f"a blend needs one positive weight per dataset, got {list(weights)}")
        if len(datasets) > np.iinfo(np.int16).max:
            raise UserError(f"a blend of {len(datasets)} datasets: at most {np.iinfo(np.int16).max}")
        self.components = [SequenceSampler(ds, seq_length, 1, seed=_component_seed(seed, c))
                           for c, ds in enumerate(datasets)]
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.seq_length, self.batch_size, self.seed = seq_length, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.dataset_index = np.empty(0, dtype=np.int16)
        self.dataset_sample_index = np.empty(0, dtype=np.int64)

    def _ensure(self, size: int) -> None:
        """Blending indices for at least the first ``size`` positions. The assignment of a position does not
        depend on how many are built, so the table grows by rebuilding it twice as long."""
        if size <= len(self.dataset_index):
            return
        size = max(size, 2 * len(self.dataset_index), 4096)
        dataset_index = np.zeros(size, dtype=np.int16)
        dataset_sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, dataset_sample_index, self.weights, len(self.components),
                                       size, False)
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index

    def sample(self, index: int) -> np.ndarray:
        """Tokens ``[seq_length + 1]`` of the ``index``-th sample of the global order (a view, not a copy)."""
        self._ensure(index + 1)
        component = self.components[int(self.dataset_index[index])]
        return component.sample(int(self.dataset_sample_index[index]))


def train_sampler(
    data: str | list[BlendComponent],
    seq_length: int,
    batch_size: int,
    seed: int = 1234,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> SequenceSampler | BlendedSampler:
    """The training sampler of a stage's ``data``: a :class:`SequenceSampler` over one prepared dataset's train
    split (a blend of one is that dataset alone), a :class:`BlendedSampler` over a blend's."""
    components = prepared_components(data)
    if len(components) == 1:
        return SequenceSampler(TokenDataset(str(components[0].path / "train")), seq_length, batch_size, seed,
                               dp_rank, dp_size)
    datasets = [TokenDataset(str(c.path / "train")) for c in components]
    return BlendedSampler(datasets, [c.weight for c in components], seq_length, batch_size, seed, dp_rank, dp_size)


@dataclass(frozen=True)
class HeldOut:
    """The held-out windows of one component of a stage's ``data``, and its normalised blend weight."""

    path: Path
    weight: float
    windows: list[torch.Tensor]


def heldout_sets(data: str | list[BlendComponent], seq_length: int, max_windows: int | None = None,
                 split: str = "valid") -> list[HeldOut]:
    """Per component of ``data`` (one for a single prepared dataset): the in-order windows of its ``split``, at
    most ``max_windows`` of each. Components are never mixed: each is scored on its own."""
    sets = []
    for c in prepared_components(data):
        # The dataset is held while its windows are copied out: its memory map closes when it is collected.
        dataset = TokenDataset(str(c.path / split))
        sets.append(HeldOut(c.path, c.weight, list(eval_windows(dataset, seq_length, max_windows))))
    return sets


def eval_windows(
    dataset: TokenDataset | torch.Tensor, seq_length: int, max_windows: int | None = None
) -> Iterator[torch.Tensor]:
    """Non-overlapping int64 windows ``[seq_length]`` from the start of the stream, in order.

    ``dataset`` is a prepared split or a 1-D token tensor (see :func:`text_file_tokens`). The tail shorter
    than a window is dropped; each window is scored on predicting its tokens ``1 .. seq_length - 1``.
    """
    if seq_length < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"bad eval window shape: {seq_length=} {max_windows=}")
    tokens = dataset.tokens if isinstance(dataset, TokenDataset) else dataset.numpy()
    count = min(len(tokens) // seq_length, max_windows or len(tokens))
    if count < 1:
        source = dataset.prefix if isinstance(dataset, TokenDataset) else "eval text"
        raise UserError(f"{source}: {len(tokens)} tokens, not enough for one eval window of {seq_length}")
    return (torch.from_numpy(tokens[i * seq_length : (i + 1) * seq_length].astype(np.int64)) for i in range(count))


def text_file_tokens(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The UTF-8 text file ``path`` tokenized without special tokens: int64 ``[num_tokens]``.

    The file gets the same binary / UTF-8 / emptiness checks as corpus files in prepare_data.
    """
    ids = tokenizer(read_text(Path(path)), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
