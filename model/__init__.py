"""CPM-2 encoder-decoder model (SPEC §2): ``from model import EncDecConfig, EncDecModel``."""
from .configuration_enc_dec import EncDecConfig
from .enc_dec_modeling import EncDecModel, additive_mask, drop_alias_keys

__all__ = ["EncDecConfig", "EncDecModel", "additive_mask", "drop_alias_keys"]
