"""The WKV-7 operator: one signature, several implementations (see `wkv7`)."""
from goosejax.wkv.dispatch import IMPLEMENTATIONS, wkv7
from goosejax.wkv.reference import wkv7_reference, wkv7_step

__all__ = ["IMPLEMENTATIONS", "wkv7", "wkv7_reference", "wkv7_step"]
