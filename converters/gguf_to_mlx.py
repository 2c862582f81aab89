"""Convert a llama-architecture GGUF file into an mlx-lm model folder:
`mlx_kvq.convert_gguf --gguf PATH --out DIR [--dtype float16]` (the
conversion itself is mlx_kvq.gguf)."""

import argparse

from ..gguf import DTYPES, GGUFError, convert


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a llama GGUF file to an mlx-lm model folder.")
    parser.add_argument("--gguf", required=True, help="Path to the .gguf file")
    parser.add_argument("--out", required=True, help="Output model folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        out = convert(args.gguf, args.out, args.dtype, overwrite=args.overwrite)
    except (GGUFError, FileExistsError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
