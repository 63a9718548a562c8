"""An imported checkpoint of the authors' code runs through the stages a user runs: import,
extract-features with its config, decode, transcribe (tests/authors_reference.py is their model)."""

import json
import sys
from pathlib import Path

import torch
from e2e_helpers import mavsr

from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.avhubert import AVHubertConfig, AVHubertVideoEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from authors_reference import AuthorsAVSR  # noqa: E402

AVH = dict(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
           conv_pos=16, conv_pos_groups=4, resnet_channels=8)


def _authors_checkpoint(d: Path, out: Path) -> None:
    """A Llama-MTSK model of theirs over the recipe's Whisper and Llama, saved as their bf16 run does."""
    from transformers import AutoFeatureExtractor, WhisperModel  # after mavsr_cli: its torchaudio guard

    torch.manual_seed(0)
    avh = AVHubertVideoEncoder(AVHubertConfig(**AVH))
    torch.save({"model": avh.fairseq_state(), "cfg": {"model": AVH}}, d / "models/avhubert_import.pt")
    llm, tok = llm_mod.load(str(d / "models/llm"))
    ref = AuthorsAVSR(llm, tok, WhisperModel.from_pretrained(d / "models/whisper").encoder,
                      AutoFeatureExtractor.from_pretrained(d / "models/whisper"), avh, [4, 16], [2, 5])
    torch.save(ref.checkpoint_state(torch.bfloat16), out)


def test_an_imported_checkpoint_decodes_and_transcribes(recipe, tmp_path):
    d = recipe
    _authors_checkpoint(d, tmp_path / "model_avg_1.pth")
    r = mavsr(d, "import", "omni-avsr", str(tmp_path / "model_avg_1.pth"), "--exp", "exp/imported", "--llm",
              "models/llm", "--audio-encoder", "models/whisper", "--video-encoder", "models/avhubert_import.pt",
              "--audio-rates", "4,16", "--video-rates", "2,5")
    assert "rates a4v2,a4v5,a16v2,a16v5" in r.stdout and "mavsr extract-features --config exp/imported" in r.stdout
    again = mavsr(d, "import", "omni-avsr", str(tmp_path / "model_avg_1.pth"), "--exp", "exp/imported", "--llm",
                  "models/llm", ok=False)
    assert again.returncode != 0 and "exists; use --force" in again.stderr
    feats = mavsr(d, "extract-features", "--config", "exp/imported/config.yaml", "--split", "test")
    assert "next: mavsr decode --exp exp/imported --sweep" in feats.stdout  # not train: it has its checkpoint
    mavsr(d, "decode", "--exp", "exp/imported", "--audio-rate", "16", "--video-rate", "5", "--beam", "1")
    hyp = [json.loads(x) for x in (d / "exp/imported/decode_a16v5_beam1/test/hyp.jsonl").read_text().splitlines()]
    assert len(hyp) == 4
    rec = json.loads((d / "data/test/manifest.jsonl").read_text().splitlines()[0])
    video = d / rec["video"]
    got = json.loads(mavsr(d, "transcribe", str(video), "--exp", "exp/imported", "--audio-rate", "16",
                           "--video-rate", "5", "--beam", "1", "--json").stdout)
    cached = next(h for h in hyp if h["id"] == rec["id"])
    assert got["text"] == cached["hyp"] and got["tokens_in"] == cached["tokens_in"]
    mavsr(d, "decode", "--exp", "exp/imported", "--audio-rate", "4", "--video-rate", "2")  # beam 15, 32 tokens
    assert len((d / "exp/imported/decode_a4v2_beam15/test/hyp.jsonl").read_text().splitlines()) == 4
