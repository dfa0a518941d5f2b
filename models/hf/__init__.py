"""Hugging Face transformers models behind loopscope's ``LoopedModel`` interface (extra ``hf``).

- ``from_pretrained(path, loop_layers=(a, b), injection=...)``: a local checkpoint directory as a
  looped model — ``RetrofitLoop`` (decoder layers ``[a, b)`` looped; ``llama``, ``mistral``,
  ``qwen2``, ``qwen3``, ``gpt2``) or ``HrmLoop`` (transformers' native looped ``hrm_text``, one
  H-cycle per loop). ``build_model("hf", path=..., loop_layers=..., injection=...)`` is the same.
- ``save_pretrained(model, path)``: the checkpoint plus the adapter's settings and weights.
- ``inspect_checkpoint(path, ...)``: check a directory and the adapter arguments, loading no
  weight; ``checkpoint_identity(path)``: a hash of its files (the run fingerprint holds it).
- A study fine-tunes an adapter (``trainable``: ``all``, ``loop`` or ``head``; see
  ``set_trainable``) and stores it in one ``model.safetensors`` that ``models.load_model``
  rebuilds without the original directory (``hf_metadata`` / ``rebuild``).

transformers is imported only when a model is loaded or run; without it the error names the extra
(``pip install -e '.[hf]'``).
"""

from models.hf.adapter import HFLoopConfig, HFLoopedModel
from models.hf.hrm import HrmLoop
from models.hf.loading import (
    SUPPORTED_MODEL_TYPES,
    TRAINABLE,
    checkpoint_identity,
    from_pretrained,
    hf_metadata,
    inspect_checkpoint,
    is_hf_checkpoint,
    rebuild,
    require_transformers,
    save_pretrained,
    set_trainable,
)
from models.hf.retrofit import RetrofitLoop

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TRAINABLE",
    "HFLoopConfig",
    "HFLoopedModel",
    "HrmLoop",
    "RetrofitLoop",
    "checkpoint_identity",
    "from_pretrained",
    "hf_metadata",
    "inspect_checkpoint",
    "is_hf_checkpoint",
    "rebuild",
    "require_transformers",
    "save_pretrained",
    "set_trainable",
]
