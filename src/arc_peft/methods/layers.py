"""The base of every method's adapter layers (``nn.Module`` s the runtime attaches to sites) and
of the state several sites share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import AdapterConfig

__all__ = ["PLACEMENTS", "Adapter", "SharedState"]


PLACEMENTS = ("input", "parallel", "sequential")


class Adapter(nn.Module):
    """Base class of every adapter layer: what the runtime attaches to a site, and what
    ``arc_peft.freeze_backbone`` and ``arc_peft.count_parameters`` recognise as adapter state
    (structurally, by this type).

    A method's adapter declares:

    * ``placement``: where it acts. ``"input"`` — it maps the site's input to a new input
      (ARC); ``"parallel"`` — its output, computed from the site's input, is added to the
      site's output (AdaptMLP); ``"sequential"`` — its output, computed from the site's output,
      is added to it. Anything but ``"input"`` needs a site whose output end is known.
    * ``affine()``: the eval-mode map ``x -> x·M + b`` of an input adapter, which
      ``arc_peft.merge_adapter`` folds into the layers reading the site's input; ``None`` (the
      default) when the adapter is not such a map, with ``merge_refusal`` saying why.
    * ``shared``: a ``SharedState`` this layer reads but does not own (ARC's shared ``U``), or
      ``None``.
    * ``after_norm()``: optionally, the same map computed from the LayerNorm writing its input,
      for compiled training (see there); ``None`` (the default) when not provided.

    ``config`` is set by injection: the config the layer was built from.
    """

    placement: str = "input"
    merge_refusal: str = "it is not a linear map of the site's input"
    config: AdapterConfig

    @property
    def shared(self) -> SharedState | None:
        return None

    def affine(
        self, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``(M, b)`` with ``adapter(x) == x @ M + b`` in eval mode, or ``None``.

        Args:
            dtype: Compute in this dtype (float64 for an exact fold); default: the weights'.
            device: Compute on this device; default: the weights'.
        """
        return None

    def after_norm(
        self,
        x_hat: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        y: Tensor,
        scale: Tensor | None = None,
    ) -> Tensor | None:
        """This input adapter's output on ``y = x̂·weight + bias``, the output of the norm that
        writes the site's input, given the norm's normalised input ``x̂`` too (a LayerNorm's;
        for an RMS norm ``x̂ = x_hat·scale``, its input and its ``N×1`` ``rsqrt``); or ``None``
        (the default): the adapter then runs on ``y`` at the site, as always.

        The runtime calls it in compiled training steps only (``AdapterSlot._norm_hook``), so
        that the backward pass can read ``x̂``, which the norm's own backward keeps, instead of
        a token-sized tensor of the adapter's own (``methods.lean.normalized_down_product``).
        It must compute the same map as ``forward(y)``, to float rounding. ``scale`` is passed
        only after an RMS norm, so a method that folds LayerNorms alone may leave it out.
        """
        return None


class SharedState(Adapter):
    """Adapter state that several sites of one injection share (ARC's ``U``), held apart from
    them by the runtime (``arc_peft.runtime.shared``) on the nearest module above every site of
    its group. It never runs.

    Args:
        anchor: Path of the group's first site: adapter files store the shared state under that
            site's slot.
    """

    holds: str = "shared state"  # what, for the message of a mistaken call

    def __init__(self, anchor: str = "") -> None:
        super().__init__()
        self.anchor = anchor

    def forward(self, *args: object) -> Tensor:
        raise RuntimeError(
            f"{type(self).__name__} holds {self.holds}; the adapter layers that read it run"
        )
