"""KV transfers between prefill and decode workers, tracked in Redis, and the worker registry."""

from services.transfer.ledger import (
    DEFAULT_PREFIX,
    InvalidTransition,
    LedgerError,
    TransferLedger,
    TransferRecord,
    TransferState,
    UnknownTransfer,
)
from services.transfer.registry import WorkerInfo, WorkerRegistry

__all__ = [
    "DEFAULT_PREFIX", "InvalidTransition", "LedgerError", "TransferLedger", "TransferRecord", "TransferState",
    "UnknownTransfer", "WorkerInfo", "WorkerRegistry",
]
