"""MAC: a memory of amortized contexts, the gradient-free knowledge mode (METHODS §2).

amortizer (document -> T x d), bank (the stored modulations), aggregator (question + memory ->
T x d), injection (T x d -> per-layer prefix for the frozen base), networks (the trainable
parts), system (ingest / answer), training (meta-training the networks).
"""

from adaptation.mac.bank import MemoryBank
from adaptation.mac.system import MacSystem

__all__ = ["MacSystem", "MemoryBank"]
