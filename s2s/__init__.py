"""s2s: a self-hosted speech-to-speech voice assistant (VAD -> STT -> LLM -> TTS, streamed)."""
