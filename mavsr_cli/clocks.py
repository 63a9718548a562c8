"""The streams' clocks, the one place they are written: every stage, model and rate reads them here."""

SAMPLE_RATE = 16000  # audio samples per second everywhere in mavsr (Whisper's input rate)
AUDIO_HZ = 50  # Whisper encoder frames per second: 10 ms mel hop, then a stride-2 convolution
SAMPLES_PER_AUDIO_FRAME = SAMPLE_RATE // AUDIO_HZ  # 320
FPS = 25  # video frames per second (AV-HuBERT's input rate, and the LRS corpora's)


def audio_frames(samples: int) -> int:
    """Whisper encoder frames of a waveform of this many samples, as mavsr keeps them (at least one)."""
    return max(1, samples // SAMPLES_PER_AUDIO_FRAME)
