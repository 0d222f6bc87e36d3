"""Export a model to GGUF, for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    python export_gguf.py                                              # out/sft -> out/gguf/model-f16.gguf
    python export_gguf.py --model out/sft/adapter --outtype q8_0       # a LoRA adapter, merged into its base
    python export_gguf.py --model out/pretrain --outfile base.gguf --outtype f32

--model is anything model_sample.py opens (ckpt.pt, run dir, HF export, peft adapter dir, any HF Llama); its
tokenizer and chat template go into the file (support/loading/gguf_export.py says how). Then:

    llama-cli -m out/gguf/model-f16.gguf -cnv                          # llama.cpp
    cd out/gguf && ollama create mymodel -f Modelfile && ollama run mymodel
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from support.cli import ArgumentParser
from support.loading.gguf_export import OUTTYPES, modelfile, tokenizer_problems, write_gguf
from support.loading.sources import open_model


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/sft", help="any model source (ckpt.pt, run dir, HF dir, adapter dir)")
    p.add_argument("--tokenizer_path", default=None, help="default: the one saved with the model")
    p.add_argument("--outfile", default=None, help="default: out/gguf/model-OUTTYPE.gguf")
    p.add_argument("--outtype", default="f16", help=f"{', '.join(OUTTYPES)}: the matrices' type (norms stay f32)")
    p.add_argument("--temperature", type=float, default=0.7, help="the Modelfile's default (model_sample.py's)")
    p.add_argument("--top_p", type=float, default=0.9, help="the Modelfile's default (model_sample.py's)")
    args = p.parse_args(argv)
    outfile = Path(args.outfile or f"out/gguf/model-{args.outtype}.gguf")
    if args.outtype not in OUTTYPES:  # before the model is read
        sys.exit(f"error: --outtype {args.outtype!r} is not supported (choose from {', '.join(OUTTYPES)})")
    try:
        model, tokenizer, origin = open_model(args.model, args.tokenizer_path)
        _, warning = tokenizer_problems(tokenizer)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if args.outfile is None:
            outfile.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(model, tokenizer, outfile, args.outtype, name=Path(origin["source"]).name)
        text = modelfile(outfile.name, tokenizer, model.config.max_seq_len, args.temperature, args.top_p)
        (outfile.parent / "Modelfile").write_text(text, encoding="utf-8")
    except (FileNotFoundError, ValueError) as e:  # ExportError is a ValueError: one line naming what
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write {outfile}: {e.strerror}")
    size = os.path.getsize(outfile)
    print(f"wrote {outfile} ({size / 2**20:.1f} MiB, {args.outtype}, {model.num_params() / 1e6:.2f}M params from "
          f"{origin['source']}) and {outfile.parent / 'Modelfile'}")


if __name__ == "__main__":
    main()
