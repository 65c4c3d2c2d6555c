"""Online (training-time) blocks and what runs them while training: :mod:`.conv` holds
:class:`OnlineConv` and :class:`OfflineBlock`, :mod:`.accumulate` gradient accumulation
that generates each kernel once per optimizer step."""

from .accumulate import accumulate
from .conv import OfflineBlock, OnlineConv

__all__ = ["OnlineConv", "OfflineBlock", "accumulate"]
