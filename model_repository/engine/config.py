"""Model configuration (the JSON form of config.pbtxt Triton hands to initialize()).

Only the `parameters` map and `input` dims are read; tests build the same dict by hand.
"""
from dataclasses import dataclass
from typing import Optional

_FALSE = ("0", "false", "False")


def param(config: dict, key: str, default: str = "") -> str:
    """String parameter `key` of the config, or `default` when absent or empty."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value not in ("", None) else default


def enabled(config: dict, key: str, default: str = "1") -> bool:
    """A 0/1 parameter (also accepts true/false); anything but 0/false is on."""
    return param(config, key, default) not in _FALSE


def input_dims(config: dict, name: str) -> Optional[list]:
    """The dims of input `name` in the config (without the batch dim), or None."""
    dims = next((i.get("dims") for i in config.get("input", []) if i.get("name") == name), None)
    return [int(d) for d in dims] if dims else None


@dataclass
class DecoderSettings:
    """The decoder's tunables (rendered by render.py; defaults equal render's)."""
    family: str = "whisper"
    max_sequences: int = 64
    idle_timeout_s: float = 60.0
    default_top_k: int = 5
    vocab: Optional[int] = None           # None: taken from the step graph or the first logits
    max_positions: Optional[int] = None   # max_target_positions; None: unchecked
    buffer_pool_bytes: int = 64 << 20
    # a batch whose sequences' cross rows form at most this many runs of consecutive rows runs
    # as that many decoder_step calls on views; more fragmented batches copy their rows together
    max_runs: int = 2
    # ... or as one call with dummy rows for the missing ones when at most this fraction is missing
    max_dummy_fraction: float = 0.25
    # the same batch again reorders its beams inside its KV slab (only beams whose parent is
    # another beam are copied) instead of gathering a new slab
    reorder_in_place: bool = True
    warmup: bool = True
    # glibc heap of the process (engine/heap.py configure_heap; 0: glibc's defaults)
    heap_mmap_threshold_bytes: int = 0
    heap_arena_max: int = 0

    @classmethod
    def from_config(cls, config: dict) -> "DecoderSettings":
        vocab = int(param(config, "vocab_size", "-1"))
        max_pos = int(param(config, "max_target_positions", "-1"))
        return cls(
            family=param(config, "family", "whisper"),
            max_sequences=int(param(config, "max_sequences", "64")),
            idle_timeout_s=float(param(config, "sequence_idle_timeout_s", "60")),
            default_top_k=int(param(config, "default_top_k", "5")),
            vocab=vocab if vocab > 0 else None,
            max_positions=max_pos if max_pos > 0 else None,
            buffer_pool_bytes=int(float(param(config, "buffer_pool_mb", "64")) * (1 << 20)),
            max_runs=max(1, int(param(config, "max_runs", "2"))),
            max_dummy_fraction=float(param(config, "max_dummy_fraction", "0.25")),
            reorder_in_place=enabled(config, "kv_reorder_in_place"),
            warmup=enabled(config, "warmup"),
            heap_mmap_threshold_bytes=int(float(param(config, "heap_mmap_threshold_mb", "0")) * (1 << 20)),
            heap_arena_max=int(param(config, "heap_arena_max", "0")),
        )
