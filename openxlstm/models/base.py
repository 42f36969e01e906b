"""What every model of the registry shares, written once.

``Model`` is an ``nn.Module`` with a config dataclass (``config_class``; ``to_dict``/``from_dict``): parameter
groups (``no_weight_decay`` is the per-model rule), parameter count, run-time choices (kernels, activation
checkpointing: on the instance, never in the config), ``save_pretrained`` / ``from_pretrained`` through
``openxlstm.io``.

``LanguageModel`` adds the calling convention every language model takes:

    model(input_ids (B, S), state=None, return_state=False, labels=None, return_logits=False,
          logits_to_keep=0, cu_seqlens=None)

-> logits (B, S, V); (logits, state) with ``return_state``; with ``labels`` an ``LMOutput`` (loss, logits,
state, num_tokens). ``state`` continues a sequence exactly and is never modified; ``cu_seqlens`` runs packed
documents each as if alone. Subclasses implement ``forward``, ``init_state`` and ``get_input_embeddings``.
Forecasters (``tirex.py``) are Models with their own ``forward`` and ``forecast``.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..errors import UserError
from ..ops.backends import Backends


_FORMATS: dict = {}  # "save" and "load": filled by ``openxlstm.io``, which builds models (so models cannot import it)


def use_formats(save: Callable, load: Callable) -> None:
    """Called by ``openxlstm.io`` when it is imported (``import openxlstm`` imports it): the functions behind
    ``save_pretrained`` and ``from_pretrained``."""
    _FORMATS.update(save=save, load=load)


class Model(nn.Module):
    """Base of every registered model."""

    config_class: type = object

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.backends = Backends()
        self.activation_checkpointing = False

    # run-time choices ------------------------------------------------------------------------------------
    def set_backends(self, mlstm: str = "auto", slstm: str = "auto", chunk_size: Optional[int] = None):
        """Choose the recurrent cells' kernels at run time (not saved with the model); models without a cell
        of a kind ignore its choice. Returns the model."""
        self.backends = Backends(mlstm=mlstm, slstm=slstm, chunk_size=chunk_size)
        return self

    def set_activation_checkpointing(self, enabled: bool = True):
        """Recompute each block's forward during backward instead of keeping its activations (training only;
        not saved with the model). Same results; memory per block drops to its input. Returns the model."""
        self.activation_checkpointing = bool(enabled)
        return self

    # optimizer -----------------------------------------------------------------------------------------
    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """True for the parameters AdamW does not decay: vectors (norms, biases, gains). Subclasses add
        their own (the input embedding of language models, the sLSTM recurrent matrices of xLSTM)."""
        return param.dim() < 2

    def weight_decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decay, no_decay) over the trainable parameters, each counted once (a tied head shares the
        embedding's)."""
        decay, no_decay, seen = [], [], set()
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if self.no_weight_decay(name, p) else decay).append(p)
        return decay, no_decay

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for ``torch.optim.AdamW``."""
        decay, no_decay = self.weight_decay_groups()
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # checkpoints ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory, overwrite: bool = False, **kwargs):
        """Write the model into ``directory`` in its own format, atomically; a non-empty directory is replaced
        only with ``overwrite=True``. ``openxlstm.from_pretrained`` reads it back. Returns its path."""
        return _FORMATS["save"](self, directory, overwrite=overwrite, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, **kwargs):
        """The model saved in ``path`` (see ``openxlstm.from_pretrained``), checked to be a ``cls``."""
        model = _FORMATS["load"](path, dtype=dtype, device=device, **kwargs)
        if not isinstance(model, cls):
            raise UserError(f"{str(path)!r} holds a {type(model).__name__}, not a {cls.__name__}: use "
                            f"openxlstm.from_pretrained to load any model")
        return model


class LanguageModel(Model):
    """Base of every language model: a Model with a state, an input embedding, a tokenizer and generation."""

    def __init__(self, config):
        super().__init__(config)
        self.tokenizer = None  # set by from_pretrained when the checkpoint has one; used by generate

    # state ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None):
        """The state of ``batch_size`` empty sequences (what ``state=None`` means), on ``device`` (default: the
        weights')."""
        raise NotImplementedError

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Vectors and the input embedding, as the reference splits them."""
        return param.dim() < 2 or param is self.get_input_embeddings().weight

    # generation ----------------------------------------------------------------------------------------
    def generate(self, prompt, tokenizer=None, **kwargs):
        """Continue ``prompt``: prefill in one pass, then decode token by token with the recurrent state. The
        tokenizer defaults to the model's own; see ``openxlstm.generation.generate`` for the arguments."""
        from ..generation import generate

        return generate(self, prompt, tokenizer if tokenizer is not None else self.tokenizer, **kwargs)


def closest_width(count: Callable[[int], int], target: int, multiple: int, lo: int = 1, hi: int = 1 << 16) -> int:
    """The multiple of ``multiple`` in [lo*multiple, hi*multiple] whose ``count(width)`` is closest to
    ``target`` (count increasing in width): how the baselines are sized to another model's parameters."""
    a, b = lo, hi
    while a < b:  # the smallest k with count(k * multiple) >= target
        mid = (a + b) // 2
        if count(mid * multiple) >= target:
            b = mid
        else:
            a = mid + 1
    candidates = [k for k in (a - 1, a) if k >= lo]
    return multiple * min(candidates, key=lambda k: abs(count(k * multiple) - target))


__all__ = ["Model", "LanguageModel", "closest_width", "use_formats"]
