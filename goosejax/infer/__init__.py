"""Inference: prefill + jitted decode loop, official-order sampling, generate."""
from goosejax.infer.generate import (GenerationError, Generator, decode_loop, generate,
                                     official_occurrence_weights)
from goosejax.infer.prefill import prefill_last, prefill_split
from goosejax.infer.sampling import SamplingConfig, sampling_probs
from goosejax.infer.decode import DecodeWeights, decode_step, decode_weights

__all__ = ["DecodeWeights", "GenerationError", "Generator", "SamplingConfig", "decode_loop",
           "decode_step", "decode_weights", "generate",
           "official_occurrence_weights", "prefill_last", "prefill_split", "sampling_probs"]
