"""Goldens for reading generation parameters out of PNG, JPEG and WebP pictures, as A1111 1.10's
`modules/images.py: read_info_from_image` reads them (PNG Info, the `png-info` API, Extras, and
drag-and-drop restore), and for the EXIF it writes into its own JPEG and WebP pictures.

The pictures are written the ways A1111 writes them, over Pillow 9.5.0 and piexif 1.1.3 (the
versions it pins):
- `save_image_with_geninfo` for .jpg/.webp: `image.save(quality=80)`, then
  `piexif.insert(piexif.dump({"Exif": {UserComment: UserComment.dump(geninfo, "unicode")}}))`;
- the API's `encode_pil_to_base64`: `image.save(format=..., exif=exif_bytes, quality=80)`;
and the ways other tools and odd files carry them (an ASCII-prefixed or unprefixed UserComment,
little-endian EXIF, a PNG's `eXIf` chunk beside its text chunks, EXIF without a comment, two EXIF
segments, COM comments, text chunks after the image data, NovelAI's PNGs).
The expected values come from `read_info_from_image` re-implemented below line by line, run on the
pictures as Pillow opens them.

/tmp/pil95/bin/python tools/parity/make_image_info_fixtures.py
    (pip install pillow==9.5.0 piexif==1.1.3 numpy; writes tests/fixtures/image_info/)
"""
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import piexif
import piexif.helper
import PIL
from PIL import Image, PngImagePlugin

assert PIL.__version__ == "9.5.0", f"Pillow 9.5.0 is A1111's; this is {PIL.__version__}"
assert piexif.VERSION == "1.1.3", piexif.VERSION
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "image_info")

IGNORED_INFO_KEYS = {
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
}


# sd_samplers.samplers_map of A1111 1.10 (each sampler's name in lower case and its aliases), as
# far as NovelAI's sampler names can reach it; transcribed from sd_samplers_kdiffusion.py.
SAMPLERS_MAP = {
    "k_euler_ancestral": "Euler a", "k_euler_a": "Euler a", "euler a": "Euler a", "k_euler": "Euler",
    "euler": "Euler", "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_lms": "LMS", "ddim": "DDIM",
}


def read_info_from_image(image):
    """modules/images.py (A1111 1.10); its NovelAI branch's errors.report left out."""
    items = (image.info or {}).copy()
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        exif_data = items["exif"]
        try:
            exif = piexif.load(exif_data)
        except OSError:
            exif = None
        exif_comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
        try:
            exif_comment = piexif.helper.UserComment.load(exif_comment)
        except ValueError:
            exif_comment = exif_comment.decode("utf8", errors="ignore")
        if exif_comment:
            geninfo = exif_comment
    elif "comment" in items:  # for gif
        if isinstance(items["comment"], bytes):
            geninfo = items["comment"].decode("utf8", errors="ignore")
        else:
            geninfo = items["comment"]
    for field in IGNORED_INFO_KEYS:
        items.pop(field, None)
    if items.get("Software", None) == "NovelAI":
        try:
            json_info = json.loads(items["Comment"])
            sampler = SAMPLERS_MAP.get(json_info["sampler"], "Euler a")

            geninfo = f"""{items["Description"]}
Negative prompt: {json_info["uc"]}
Steps: {json_info["steps"]}, Sampler: {sampler}, CFG scale: {json_info["scale"]}, Seed: {json_info["seed"]}, Size: {image.width}x{image.height}, Clip skip: 2, ENSD: 31337"""
        except Exception:
            pass
    return geninfo, items


# infotext_utils.parse_generation_parameters (A1111 1.10) up to its pairs, before the defaults it
# fills in and its WxH split.
from make_generation_parameters_fixtures import split_infotext as split_generation_parameters  # noqa: E402




def exif_bytes(text):
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text or "", encoding="unicode")}})


def raw_comment_exif(raw):
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: raw}})


def picture(w=24, h=16, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


INFOTEXT = (
    "a café at dusk, <lora:subject_cat:0.8>, (watercolor:1.2) \U0001F600\n"
    "Negative prompt: blurry, \"low quality\"\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1234, Size: 24x16, "
    "Model hash: 0123456789, Model: miniworld, Lora hashes: \"subject_cat: abcdef012345\", Version: v1.10.1"
)


PARSE_CASES = [
    INFOTEXT,
    " a vlox emblem \n Negative prompt: blurry \nSteps: 20, Sampler: Euler, Seed: 1",
    "Steps: 20,Sampler:Euler,Seed:1",
    "line1\nline2\nSteps: 20, Seed: 5",
    "a\nSteps: 2, Bad: \"unterminated, X: 1, Y: 2",
    "a\nSteps: 2, Esc: \"not json \\x\", Empty: , Z: 3",
    "\n\nfirst\n\nsecond\nNegative prompt:\n  neg two  \nSteps: 1, Sampler: DPM++ 2M, CFG scale: 7, Lora hashes: \"a: 1, b: 2\", Template: \"x\\ny \\u00e9\"",
    "only a prompt",
    "a cat\r\nSteps: 3, Sampler: Euler a\r, Size: 64x64",
    "a cat\nNegative prompt: x\nSteps: 30, Sampler: Euler, Seed: 7\ntrailing line",
    "caf\u00e9 \u4e2d\nSteps: 5, Sampler: Euler, Model: \u4e2d\u6587-v1/x, Seed: 2",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}

    def keep(name, data):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            geninfo, items = read_info_from_image(im)
        # A JPEG's `comment` is bytes in Pillow's info; the API answers it decoded.
        items = {k: v.decode("utf8", errors="ignore") if k == "comment" and isinstance(v, bytes) else v for k, v in items.items()}
        for k, v in items.items():
            assert isinstance(v, str), (name, k, v)
        expected[name] = {"info": geninfo, "items": list(items.items())}  # in Pillow's order

    def saved(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    img = picture()
    # save_image_with_geninfo: the picture first, then piexif.insert.
    for ext, fmt in (("jpg", "JPEG"), ("webp", "WEBP")):
        out = io.BytesIO()
        piexif.insert(exif_bytes(INFOTEXT), saved(img, fmt, quality=80, lossless=False), out)
        keep(f"a1111_saved.{ext}", out.getvalue())
    # encode_pil_to_base64 (the API): EXIF through Pillow's save.
    keep("a1111_api.jpg", saved(img, "JPEG", exif=exif_bytes(INFOTEXT), quality=80))
    keep("a1111_api.webp", saved(img, "WEBP", exif=exif_bytes(INFOTEXT), quality=80))
    keep("a1111_api_empty.jpg", saved(img, "JPEG", exif=exif_bytes(""), quality=80))
    # UserComments other tools write, and broken ones A1111 falls back on (utf-8, errors ignored).
    comments = {
        "ascii_prefix": piexif.helper.UserComment.dump("Steps: 30, Seed: 7", encoding="ascii"),
        "undefined_prefix": b"\x00" * 8 + "Steps: 12, Seed: 9 é".encode(),
        "unprefixed_utf8": b"Steps: 20\xff, Seed: 1 \xc3\xa9 end",
        "short": b"abc",
        "odd_utf16": b"UNICODE\x00" + "ok".encode("utf_16_be") + b"\xd8\x00\x00a" + b"\x41",
        "ascii_bad_bytes": b"ASCII\x00\x00\x00caf\xe9 ok",
    }
    for name, raw in comments.items():
        keep(f"{name}.jpg", saved(img, "JPEG", exif=raw_comment_exif(raw), quality=80))
    # A little-endian TIFF (cameras and some tools; piexif writes big-endian only), laid out by hand.
    comment = piexif.helper.UserComment.dump("little endian \u00e9\u4e2d", encoding="unicode")
    ifd0 = struct.pack("<H", 2) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0) + struct.pack("<HHII", 0x8769, 4, 1, 38) + struct.pack("<I", 0)
    exif_ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x9286, 7, len(comment), 56) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + exif_ifd + comment
    assert len(b"II*\x00") + 4 + len(ifd0) == 38 and 38 + len(exif_ifd) == 56
    keep("little_endian.jpg", saved(img, "JPEG", exif=b"Exif\x00\x00" + tiff, quality=80))
    # EXIF with no comment at all, and no EXIF.
    only = Image.Exif()
    only[0x0112] = 6
    keep("orientation_only.jpg", saved(img, "JPEG", exif=only.tobytes(), quality=80))
    keep("plain.jpg", saved(img, "JPEG", quality=80))
    keep("plain.webp", saved(img, "WEBP", quality=80))
    keep("lossless.webp", saved(img, "WEBP", lossless=True, exif=exif_bytes("lossless parameters")))
    # PNGs: text chunks are items; an eXIf comment wins over `parameters` unless it is empty.
    def png(texts, exif=None):
        info = PngImagePlugin.PngInfo()
        for k, v in texts:
            info.add_text(k, v) if k != "zipped" else info.add_text(k, v, zip=True)
        kw = {"pnginfo": info}
        if exif is not None:
            kw["exif"] = exif
        return saved(img, "PNG", **kw)

    keep("text.png", png([("parameters", INFOTEXT), ("postprocessing", "Postprocess upscale by: 2"), ("zipped", "z" * 40)]))
    keep("exif_wins.png", png([("parameters", "from the text chunk"), ("Software", "x")], exif_bytes("from eXIf")))
    keep("exif_empty.png", png([("parameters", "from the text chunk")], exif_bytes("")))
    # NovelAI's PNGs: Description and a Comment JSON, made an infotext (floats as Python prints them).
    def novelai(comment, extra=()):
        return png([("Title", "AI generated image"), ("Description", "1girl, {masterpiece}, caf\u00e9"), ("Software", "NovelAI"),
                    ("Source", "Stable Diffusion XL C1E1DE52"), ("Comment", json.dumps(comment)), *extra])
    keep("novelai.png", novelai({"steps": 28, "sampler": "k_euler_ancestral", "seed": 2825307433, "strength": 0.7, "noise": 0.0,
                                 "scale": 5.0, "uc": "lowres, bad anatomy", "sm": False}))
    keep("novelai_unmapped.png", novelai({"steps": 23.0, "sampler": "k_dpmpp_2s_ancestral", "seed": 7, "scale": 11, "uc": ""}))
    keep("novelai_tiny_scale.png", novelai({"steps": 30, "sampler": "ddim", "seed": 1, "scale": 1.5e-05, "uc": None}))
    keep("novelai_no_uc.png", novelai({"steps": 28, "sampler": "k_euler", "seed": 3, "scale": 6.0}, [("parameters", "kept")]))
    keep("novelai_bad_json.png", novelai({}, [("Comment", "{not json")]))

    # Chunk order and place, as a loaded picture (A1111's images.read) has them: text after the
    # image data is read, the last value of a key given twice wins, in file order across kinds.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def before_iend(data, *chunks):
        assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
        return data[:-12] + b"".join(chunks) + data[-12:]

    base = png([("Software", "x")])
    keep("text_after_idat.png", before_iend(base, chunk(b"tEXt", b"parameters\x00after the image data"), chunk(b"tEXt", b"Software\x00y")))
    keep("exif_after_idat.png", before_iend(png([("parameters", "before")]), chunk(b"eXIf", exif_bytes("after the image data")[6:])))
    itxt = b"parameters\x00\x00\x00\x00\x00" + "from iTXt \u00e9".encode()
    keep("itxt_then_text.png", before_iend(png([]), chunk(b"iTXt", itxt), chunk(b"tEXt", b"parameters\x00from tEXt \xe9")))
    ztxt = b"parameters\x00\x00" + zlib.compress("zipped caf\u00e9, Steps: 5".encode("latin-1"))
    itxt_z = b"extra\x00\x01\x00en\x00Extra\x00" + zlib.compress("zipped \u4e2d".encode())
    keep("compressed_text.png", before_iend(png([]), chunk(b"zTXt", ztxt), chunk(b"iTXt", itxt_z), chunk(b"zTXt", b"broken\x00\x00not zlib")))
    # Streams cut short give what they hold; an `exif` zTXt or iTXt is text piexif cannot read,
    # which still counts as EXIF (no comment, and no `comment` branch).
    cut = zlib.compress(("a cat\nSteps: 20, Seed: 7" * 40).encode())
    keep("truncated_ztxt.png", before_iend(png([]), chunk(b"zTXt", b"parameters\x00\x00" + cut[: len(cut) // 2])))
    keep("truncated_itxt.png", before_iend(png([]), chunk(b"iTXt", b"parameters\x00\x01\x00\x00\x00" + cut[: len(cut) // 2])))
    keep("exif_itxt.png", before_iend(png([]), chunk(b"eXIf", exif_bytes("from exif")[6:]), chunk(b"iTXt", b"exif\x00\x00\x00\x00\x00text")))
    keep("exif_ztxt_comment.png", before_iend(png([("comment", "a comment")]), chunk(b"zTXt", b"exif\x00\x00" + zlib.compress(b"text"))))

    # JPEGs with two EXIF segments (Pillow keeps the first) and an `Exif\0` header of another kind.
    def jpeg_with_app1(*payloads):
        data = saved(img, "JPEG", quality=80)
        segments = b"".join(b"\xff\xe1" + struct.pack(">H", len(p) + 2) + p for p in payloads)
        return data[:2] + segments + data[2:]

    keep("two_exif.jpg", jpeg_with_app1(exif_bytes("first"), exif_bytes("second")))
    keep("two_exif_first_empty.jpg", jpeg_with_app1(piexif.dump({"0th": {piexif.ImageIFD.Orientation: 1}}), exif_bytes("second")))
    keep("exif_odd_header.jpg", jpeg_with_app1(b"Exif\x00\xff" + exif_bytes("odd header")[6:]))
    # A comment typed ASCII (piexif reads it without its last byte) and JIS-prefixed ASCII and kana.
    def tiff_comment(kind, raw):
        ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 26) + struct.pack(">I", 0)
        exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, kind, len(raw), 44) + struct.pack(">I", 0)
        return b"Exif\x00\x00MM\x00*" + struct.pack(">I", 8) + ifd0 + exif_ifd + raw

    keep("ascii_typed.jpg", saved(img, "JPEG", exif=tiff_comment(2, b"ASCII\x00\x00\x00Steps: 3, Seed: 4\x00"), quality=80))
    keep("ascii_typed_no_nul.jpg", saved(img, "JPEG", exif=tiff_comment(2, b"ASCII\x00\x00\x00Steps: 3"), quality=80))
    # A count running past the data (piexif slices what is there) and a TIFF magic other than 42.
    hugecount = tiff_comment(7, b"UNICODE\x00" + "cut short".encode("utf_16_be"))
    hugecount = hugecount[:6 + 26 + 6] + struct.pack(">I", 0x7FFFFFFF) + hugecount[6 + 26 + 10:]
    keep("count_past_end.jpg", jpeg_with_app1(hugecount))
    keep("odd_magic.jpg", jpeg_with_app1(b"Exif\x00\x00MM\x00\x2b" + exif_bytes("odd magic")[10:]))
    keep("jis_kana.jpg", saved(img, "JPEG", exif=tiff_comment(7, b"JIS\x00\x00\x00\x00\x00\xb1\xb2 Steps: 6"), quality=80))
    # A COM comment is the infotext when there is no EXIF at all (A1111's branch "for gif"), and
    # a PNG `comment` chunk too, over its `parameters`.
    keep("comment_only.jpg", saved(img, "JPEG", comment="Steps: 9, Seed: 8 caf\u00e9".encode() + b"\xff", quality=80))
    keep("comment_and_exif.jpg", saved(img, "JPEG", comment=b"not read", exif=piexif.dump({"0th": {piexif.ImageIFD.Orientation: 1}}), quality=80))
    keep("comment.png", png([("parameters", "from parameters"), ("comment", "from comment")]))
    keep("surrogate_odd.jpg", saved(img, "JPEG", exif=raw_comment_exif(b"UNICODE\x00\x00o\xd8\x00A"), quality=80))

    # What A1111 writes as EXIF (piexif.dump), for our writer.
    dumps = {text: exif_bytes(text).hex() for text in ["", "hi", INFOTEXT, "tab\tnewline\n\u00e9\U0001F600"]}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        parse = [dict(zip(("text", "prompt", "negative", "fields"), (t, *split_generation_parameters(t)))) for t in PARSE_CASES]
        json.dump({"read": expected, "dumps": dumps, "parse": parse}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
