"""A tiny, randomly initialised Parler-TTS built in code (no hub): proves the code path.

Real shapes would take seconds per step here; this one has a 2-layer 32-wide T5 text
encoder, a 2-layer 32-wide decoder over 4 codebooks, and a narrow DAC codec at 44.1 kHz
with the real codec's hop (512 samples, 86 frames a second).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, T5Config

from s2s.models.stt import packaged_tiny_en_path

CODEBOOKS = 4
CODEBOOK_SIZE = 64
SAMPLE_RATE_HZ = 44_100
SPECIAL_CODE_IDS = 63
"""A random decoder also samples ids past the codebook that are not audio codes (eos aside)."""


def build_tiny_parler() -> tuple[Any, Any]:
    from dac.model import DAC
    from parler_tts import (
        ParlerTTSConfig,
        ParlerTTSDecoderConfig,
        ParlerTTSForConditionalGeneration,
    )
    from parler_tts.dac_wrapper import DACConfig

    torch.manual_seed(0)
    # Whisper's tokenizer (from the offline STT package) stands in for flan-t5's.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(packaged_tiny_en_path() / "tokenizer.json"),
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )
    vocab = len(tokenizer)
    text_encoder = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    audio_encoder = DACConfig(
        num_codebooks=CODEBOOKS,
        codebook_size=CODEBOOK_SIZE,
        latent_dim=32,
        frame_rate=86,
        sampling_rate=SAMPLE_RATE_HZ,
    )
    decoder = ParlerTTSDecoderConfig(
        vocab_size=CODEBOOK_SIZE + SPECIAL_CODE_IDS + 1,
        max_position_embeddings=512,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        hidden_size=32,
        num_codebooks=CODEBOOKS,
        pad_token_id=CODEBOOK_SIZE,
        eos_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE + 1,
    )
    config = ParlerTTSConfig.from_sub_models_config(
        text_encoder,
        audio_encoder,
        decoder,
        vocab_size=vocab,
        pad_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE + 1,
    )
    model = ParlerTTSForConditionalGeneration(config)
    # A narrow codec with the real hop: the default DAC decoder is 1536 wide (seconds a chunk).
    model.audio_encoder.model = DAC(
        encoder_dim=8,
        latent_dim=32,
        decoder_dim=32,
        n_codebooks=CODEBOOKS,
        codebook_size=CODEBOOK_SIZE,
        sample_rate=SAMPLE_RATE_HZ,
    )
    generation = model.generation_config
    generation.do_sample = True
    generation.max_length = 200
    generation.min_new_tokens = 60
    generation.pad_token_id = CODEBOOK_SIZE
    generation.eos_token_id = CODEBOOK_SIZE
    generation.decoder_start_token_id = CODEBOOK_SIZE + 1
    generation.bos_token_id = CODEBOOK_SIZE + 1
    # Ids above eos/bos are not audio codes: never sample them.
    generation.suppress_tokens = list(
        range(CODEBOOK_SIZE + 2, CODEBOOK_SIZE + SPECIAL_CODE_IDS + 1)
    )
    return model.eval(), tokenizer
