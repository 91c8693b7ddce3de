"""The model, its paged cache, the sampler and the prefill/decode loop. No network, no Ray."""

from services.engine.config import PRESETS, ModelConfig, preset
from services.engine.engine import EngineConfig, LLMEngine, RequestOutput
from services.engine.errors import CheckpointError, EngineError, InvalidRequestError, OutOfBlocksError
from services.engine.sampling import SamplingParams
from services.engine.sequence import FinishReason

__all__ = [
    "PRESETS", "CheckpointError", "EngineConfig", "EngineError", "FinishReason", "InvalidRequestError",
    "LLMEngine", "ModelConfig", "OutOfBlocksError", "RequestOutput", "SamplingParams", "preset",
]
