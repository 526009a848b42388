"""A corpus of bad inputs for `init`, `import` and the configuration, with what each must give.

Every kind writes its case into an empty temporary folder at test time (nothing binary is
stored in the repository) and names its expected outcome:

* ``"error"``: one line (a ``ValueError`` the CLI prints without a traceback, unless the
  kind names another ``exc``) containing every substring of ``match``: the file and the
  field or key at fault;
* ``"reject"``: init succeeds and rejects.parquet has a row for the image ``key`` (any row
  when ``key`` is None) whose reason contains every substring of ``match``;
* ``"ok"``: init succeeds, ``key`` is not rejected and holds ``boxes`` boxes (hostile
  input that is in fact valid: it must be read as meant).

``tests/test_corpus.py`` runs them all (one test id per kind). ``defects`` names the probe
findings a kind covers (4, 5, 6, 14, 15: see the test module).

Writers:

* init kinds: ``write(tmp) -> {"images", "annotations"?, "fmt"?, "labeled"?, "test"?,
  "settings"?}`` (the keyword arguments of ``init_run`` plus ``--set`` settings);
* import kinds: ``write(tmp, ctx) -> {"path", "fmt"?}``; ``ctx`` describes the shared
  base run (:class:`ImportContext`);
* config kinds: ``write(tmp) -> {"paths", "overrides"}`` (the arguments of
  ``load_config``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.conftest_data import write_bomb_png, write_empty, write_png, write_text_as_image

W, H = 40, 30  # size of every init image


@dataclass(frozen=True)
class Kind:
    name: str
    category: str                       # "init" | "import" | "config"
    write: Callable[..., dict]
    expect: str                         # "error" | "reject" | "ok"
    match: tuple[str, ...] = ()
    key: str | None = None
    boxes: int | None = None
    defects: tuple[int, ...] = ()
    exc: type = ValueError
    absent: str | None = None           # a path under tmp that must not exist afterwards

    @property
    def id(self) -> str:
        return f"{self.category}:{self.name}"


@dataclass
class ImportContext:
    """The base run of the import kinds: images a.png, b.png, c.png (IW x IH), categories
    crack (1) and dent (2); cycle 0 selected a.png and b.png (strategy "entropy")."""

    ids: dict[str, int]
    uris: dict[str, str]
    categories: list[dict] = field(default_factory=list)


IW, IH = 64, 48
OMIT = object()


# --------------------------------------------------------------------------- helpers
def images(tmp: Path, *names: str, w: int = W, h: int = H) -> Path:
    root = tmp / "imgs"
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        write_png(root / n, w, h)
    return root


def raw_file(folder: Path, name: bytes, data: bytes) -> None:
    """A file whose name is raw bytes (possibly not UTF-8)."""
    base = os.fsencode(str(folder))
    os.makedirs(base, exist_ok=True)
    with open(base + b"/" + name, "wb") as f:
        f.write(data)


def png_bytes(tmp: Path) -> bytes:
    return write_png(tmp / "_png_src.png", W, H).read_bytes()


CATS = [{"id": 1, "name": "crack"}]
IMG_A = {"id": 1, "file_name": "a.png", "width": W, "height": H}


def ann(**over) -> dict:
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}
    a.update(over)
    return a


def doc(images_=(IMG_A,), anns=(None,), cats: Any = CATS, **over) -> dict:
    d: dict[str, Any] = {"images": list(images_), "annotations": [ann() if a is None else a for a in anns],
                         "categories": cats}
    d.update(over)
    return {k: v for k, v in d.items() if v is not OMIT}


def coco(content: Any = None, *, text: str | None = None, raw: bytes | None = None, names=("a.png",),
         extra: Callable[[Path, Path], None] | None = None, **call) -> Callable[[Path], dict]:
    """Images `names` + c.json (a document, JSON text or raw bytes); `extra(tmp, root)`
    adds files; other keywords go to the call (callables get tmp)."""

    def write(tmp: Path) -> dict:
        root = images(tmp, *names)
        if extra is not None:
            extra(tmp, root)
        p = tmp / "c.json"
        if raw is not None:
            p.write_bytes(raw)
        elif text is not None:
            p.write_text(text)
        else:
            p.write_text(json.dumps(doc() if content is None else content))
        return {"images": root, "annotations": p, **{k: (v(tmp) if callable(v) else v) for k, v in call.items()}}

    return write


def voc_xml(filename: str | None = "a.png", objects=(("crack", (1, 1, 5, 5)),), size=None, head: str = "") -> str:
    parts = [head + "<annotation>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box in objects:
        bb = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box) if v is not None)
        parts.append(f"<object><name>{name}</name><bndbox>{bb}</bndbox></object>")
    parts.append("</annotation>")
    return "".join(parts)


def voc(files: dict[str, Any] | None = None, *, names=("a.png",), extra=None, **call) -> Callable[[Path], dict]:
    """Images `names` + a folder xml/ of files (name -> text or bytes; default a.xml)."""
    files = {"a.xml": voc_xml()} if files is None else files

    def write(tmp: Path) -> dict:
        root = images(tmp, *names)
        d = tmp / "xml"
        d.mkdir()
        for n, content in files.items():
            (d / n).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        if extra is not None:
            extra(tmp, root)
        return {"images": root, "annotations": d, "fmt": "voc", **call}

    return write


def yolo(files: dict[str, Any] | None = None, *, names=("a.png",), classes: Any = "crack\n", extra=None,
         **call) -> Callable[[Path], dict]:
    """Images `names` + a folder labels/ (classes.txt unless `classes` is None)."""
    files = {"a.txt": "0 0.5 0.5 0.25 0.25\n"} if files is None else files

    def write(tmp: Path) -> dict:
        root = images(tmp, *names)
        d = tmp / "labels"
        d.mkdir()
        if classes is not None:
            (d / "classes.txt").write_bytes(classes if isinstance(classes, bytes) else classes.encode("utf-8"))
        for n, content in files.items():
            (d / n).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        if extra is not None:
            extra(tmp, root)
        return {"images": root, "annotations": d, "fmt": "yolo", **call}

    return write


def folder(setup: Callable[[Path, Path], None]) -> Callable[[Path], dict]:
    """A folder-only pool: a.png plus what `setup(tmp, root)` writes."""

    def write(tmp: Path) -> dict:
        root = images(tmp, "a.png")
        setup(tmp, root)
        return {"images": root}

    return write


def ids_file(text: bytes | str, name: str = "ids.txt") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return p

    return make


def nonutf8_png(tmp: Path, root: Path) -> None:
    raw_file(root, b"bad\xff.png", png_bytes(tmp))


def nonutf8_folder(tmp: Path, root: Path) -> None:
    d = os.fsencode(str(root)) + b"/x/d\xfe"
    os.makedirs(d)
    raw_file(Path(os.fsdecode(d)), b"in.png", png_bytes(tmp))


def fifo(path: Path) -> None:
    os.mkfifo(path)


def E(name, write, *match, **kw) -> Kind:  # short constructors for the tables below
    return Kind(name, "init", write, "error", tuple(match), **kw)


def R(name, write, key, *match, **kw) -> Kind:
    return Kind(name, "init", write, "reject", tuple(match), key=key, **kw)


def OK(name, write, key, boxes, **kw) -> Kind:
    return Kind(name, "init", write, "ok", key=key, boxes=boxes, **kw)


DEEP = "[" * 100_000 + "]" * 100_000
HUGE = 10 ** 400
WIN = "\\"

def eps_as_png(path: Path) -> None:
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\nnewpath 0 0 moveto showpage\n")


def gif_as_png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (W, H), (120, 120, 120)).save(path, "GIF")


def sparse_jpeg(path: Path) -> None:
    """A 2 GB sparse file behind a JPEG header (costs nothing on disk)."""
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x1e\x00\x28\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
                b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00")
        f.truncate(2 * 1024 ** 3)


# --------------------------------------------------------------------------- init: folder only
FOLDER = [
    R("folder_fifo_named_png", folder(lambda t, r: fifo(r / "x.png")), "x.png", "not a regular file", defects=(1,)),
    R("folder_eps_named_png", folder(lambda t, r: eps_as_png(r / "evil.png")), "evil.png", "not allowed",
      defects=(9,)),
    R("folder_gif_named_png", folder(lambda t, r: gif_as_png(r / "g.png")), "g.png", "format GIF is not allowed",
      defects=(9,)),
    R("folder_sparse_2gb_jpeg", folder(lambda t, r: sparse_jpeg(r / "big.jpg")), "big.jpg", "truncated",
      defects=(16,)),
    R("folder_zero_byte_png", folder(lambda t, r: write_empty(r / "z.png")), "z.png", "z.png", "0-byte"),
    R("folder_text_named_png", folder(lambda t, r: write_text_as_image(r / "t.png")), "t.png", "t.png"),
    R("folder_decompression_bomb", folder(lambda t, r: write_bomb_png(r / "bomb.png")), "bomb.png", "bomb.png",
      "decompression bomb"),
    R("folder_non_utf8_file_name", folder(nonutf8_png), "bad\\xff.png", "bad\\xff.png", "not valid UTF-8",
      defects=(4,)),
    R("folder_non_utf8_folder_name", folder(nonutf8_folder), "x/d\\xfe/in.png", "not valid UTF-8", defects=(4,)),
    R("folder_non_utf8_name_colliding_with_its_escape",
      folder(lambda t, r: (nonutf8_png(t, r), write_png(r / "bad\\xff.png", W, H))),
      "bad\\xff.png~", "not valid UTF-8", defects=(4,)),
    OK("folder_backslash_in_file_name", folder(lambda t, r: write_png(r / "back\\slash.png", W, H)),
       "back\\slash.png", 0, defects=(14,)),
]

# --------------------------------------------------------------------------- init: COCO
COCO = [
    # file-level: one line naming c.json and the key
    E("coco_not_json", coco(text="{"), "c.json", "not valid JSON"),
    E("coco_not_utf8", coco(raw=b'{"images": [], "caf\xe9": 1}'), "c.json", "not valid JSON"),
    E("coco_nested_100k_deep", coco(text=DEEP), "c.json", "not valid JSON", "nested too deeply", defects=(5,)),
    E("coco_integer_of_5000_digits", coco(text='{"images": [], "x": 1' + "0" * 5000 + "}"), "c.json",
      "not valid JSON", "digits", defects=(5,)),
    E("coco_top_level_list", coco([]), "c.json", "'images'"),
    E("coco_images_not_a_list", coco({"images": {}, "categories": []}), "c.json", "'images'"),
    E("coco_without_categories", coco(doc(cats=OMIT)), "c.json", "'categories'", defects=(15,)),
    E("coco_categories_null", coco(doc(cats=None)), "c.json", "'categories'", defects=(15,)),
    E("coco_categories_not_a_list", coco(doc(cats={"1": "crack"})), "c.json", "'categories' must be a list",
      defects=(15,)),
    E("coco_annotations_not_a_list", coco(doc(annotations={"1": {}})), "c.json", "'annotations' must be a list"),
    E("coco_category_id_list", coco(doc(cats=[{"id": [1], "name": "crack"}])), "c.json", "categories[0] id",
      "not an integer", defects=(5,)),
    E("coco_category_id_dict", coco(doc(cats=[{"id": {"a": 1}, "name": "crack"}])), "c.json", "categories[0] id",
      defects=(5,)),
    E("coco_category_without_name", coco(doc(cats=[{"id": 1}])), "c.json", "categories[0]", "'name'"),
    E("coco_duplicate_category_id", coco(doc(cats=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])), "c.json",
      "duplicate category id 1"),
    E("coco_duplicate_category_name", coco(doc(cats=[{"id": 1, "name": "a"}, {"id": 2, "name": "a"}])), "c.json",
      "duplicate category name 'a'"),
    E("coco_image_id_list", coco(doc(images_=[{"id": [1], "file_name": "a.png"}], anns=[])), "c.json",
      "images[0] id"),
    E("coco_image_without_file_name", coco(doc(images_=[{"id": 1}], anns=[])), "c.json", "images[0]",
      "'file_name'"),
    E("coco_file_name_not_a_string", coco(doc(images_=[{"id": 1, "file_name": 7}], anns=[])), "c.json",
      "images[0]", "'file_name'"),
    E("coco_duplicate_image_id", coco(doc(images_=[IMG_A, {"id": 1, "file_name": "b.png"}], anns=[])), "c.json",
      "duplicate image id 1"),
    E("coco_annotation_id_list", coco(doc(anns=[ann(id=[1])])), "c.json", "annotations[0] id", "not an integer",
      defects=(5,)),
    E("coco_annotation_id_dict", coco(doc(anns=[ann(id={"x": 1})])), "c.json", "annotations[0] id",
      "not an integer", defects=(5,)),
    E("coco_duplicate_annotation_id", coco(doc(anns=[ann(), ann()])), "c.json", "duplicate annotation id 1"),
    E("coco_annotation_not_an_object", coco(doc(anns=[[1, 2]])), "c.json", "annotations[0] is not an object"),
    E("coco_annotation_of_unknown_image", coco(doc(anns=[ann(image_id=9)])), "c.json", "unknown image_id 9"),
    E("coco_annotation_image_id_list", coco(doc(anns=[ann(image_id=[1])])), "c.json", "unknown image_id [1]"),
    E("coco_annotations_folder_given_as_coco", lambda t: {**coco()(t), "annotations": t, "fmt": "coco"},
      "--format coco needs a JSON file"),
    E("coco_unknown_format_name", lambda t: {**coco()(t), "fmt": "kitti"}, "unknown annotation format 'kitti'"),
    # per-image: a reject row
    R("coco_bbox_integer_10e400", coco(doc(anns=[ann(bbox=[HUGE, 1, 2, 2])])), "a.png",
      "c.json annotation id 1 bbox", "x <401-digit integer> is too large", defects=(5,)),
    R("coco_bbox_height_10e400", coco(doc(anns=[ann(bbox=[1, 1, 2, HUGE])])), "a.png", "annotation id 1 bbox",
      "height", "too large", defects=(5,)),
    R("coco_bbox_nan", coco(doc(anns=[ann(bbox=[float("nan"), 1, 2, 2])])), "a.png", "bbox: x is nan"),
    R("coco_bbox_infinity", coco(doc(anns=[ann(bbox=[1, 1, float("inf"), 2])])), "a.png", "bbox: width is inf"),
    R("coco_bbox_float_1e308_overflows_to_inf", coco(text=json.dumps(doc()).replace("[1, 1, 5, 5]", "[1, 1, 1e999, 5]")),
      "a.png", "bbox: width is inf"),
    R("coco_bbox_negative_width", coco(doc(anns=[ann(bbox=[1, 1, -3, 2])])), "a.png", "bbox: width -3 < 0"),
    R("coco_bbox_three_numbers", coco(doc(anns=[ann(bbox=[1, 1, 2])])), "a.png", "bbox: expected [x, y, width"),
    R("coco_bbox_strings", coco(doc(anns=[ann(bbox=["1", "1", "2", "2"])])), "a.png", "bbox: expected"),
    R("coco_bbox_booleans", coco(doc(anns=[ann(bbox=[True, 1, 2, 2])])), "a.png", "bbox: expected"),
    R("coco_bbox_not_a_list", coco(doc(anns=[ann(bbox={"x": 1})])), "a.png", "bbox: expected"),
    R("coco_bbox_outside_the_image", coco(doc(anns=[ann(bbox=[30, 1, 20, 5])])), "a.png",
      "x2 50 > image width 40"),
    R("coco_bbox_too_small", coco(doc(anns=[ann(bbox=[1, 1, 0.5, 5])])), "a.png", "smaller than dataset.min_box_size"),
    R("coco_unknown_category_id", coco(doc(anns=[ann(category_id=9)])), "a.png", "category_id: unknown category 9"),
    R("coco_category_id_list_in_annotation", coco(doc(anns=[ann(category_id=[1])])), "a.png",
      "category_id: unknown category [1]"),
    R("coco_class_not_in_dataset_classes", coco(settings=["dataset.classes=[dent]"]), "a.png",
      "unknown class 'crack'"),
    R("coco_missing_image_file", coco(doc(images_=[{"id": 1, "file_name": "gone.png"}])), "gone.png",
      "c.json image id 1 file_name 'gone.png': file not found"),
    R("coco_file_name_dotdot_escape", coco(doc(images_=[{"id": 1, "file_name": "../x.png"}])), "../x.png",
      "file_name '../x.png': path escapes images root", defects=(14,)),
    R("coco_file_name_hidden_dotdot_escape", coco(doc(images_=[{"id": 1, "file_name": "sub/../../x.png"}])),
      "sub/../../x.png", "'sub/../../x.png': path escapes images root", defects=(14,)),
    R("coco_file_name_absolute_outside", coco(doc(images_=[{"id": 1, "file_name": "/etc/hostname"}])),
      "/etc/hostname", "'/etc/hostname': path escapes images root", defects=(14,)),
    R("coco_file_name_windows_dotdot_escape", coco(doc(images_=[{"id": 1, "file_name": "..\\x.png"}])),
      "..\\x.png", "path escapes images root", defects=(14,)),
    R("coco_file_name_drive_letter", coco(doc(images_=[{"id": 1, "file_name": "C:\\data\\a.png"}])),
      "C:\\data\\a.png", "path escapes images root", defects=(14,)),
    OK("coco_file_name_absolute_inside_root",
       lambda t: coco(doc(images_=[{"id": 1, "file_name": str(t / "imgs" / "a.png")}]))(t), "a.png", 1,
       defects=(14,)),
    OK("coco_file_name_absolute_inside_root_with_dotdot",
       lambda t: coco(doc(images_=[{"id": 1, "file_name": str(t / "imgs" / "sub" / ".." / "a.png")}]))(t),
       "a.png", 1, defects=(14,)),
    OK("coco_file_name_with_a_real_backslash",
       coco(doc(images_=[{"id": 1, "file_name": "back\\slash.png"}]), names=("back\\slash.png",)),
       "back\\slash.png", 1, defects=(14,)),
    OK("coco_file_name_windows_separator", coco(doc(images_=[{"id": 1, "file_name": "sub\\a.png"}]),
                                                names=("sub/a.png",)), "sub/a.png", 1, defects=(14,)),
    R("coco_file_name_lone_surrogate", coco(doc(images_=[{"id": 1, "file_name": "bad\udcff.png"}])),
      "bad\\xff.png", "not valid UTF-8", defects=(4,)),
    R("coco_file_name_lone_surrogate_of_a_non_utf8_file",
      coco(doc(images_=[{"id": 1, "file_name": "bad\udcff.png"}]), extra=nonutf8_png),
      "bad\\xff.png", "not valid UTF-8", defects=(4,)),
    R("coco_file_name_high_surrogate", coco(doc(images_=[{"id": 1, "file_name": "x\ud800.png"}])),
      "x\\ud800.png", "not valid UTF-8", defects=(4,)),
    R("coco_file_name_empty", coco(doc(images_=[{"id": 1, "file_name": "  "}])), None, "file_name: empty"),
    R("coco_file_name_with_nul", coco(doc(images_=[{"id": 1, "file_name": "a\x00.png"}])), "a\x00.png",
      "file not found"),
    R("coco_file_name_10k_characters", coco(doc(images_=[{"id": 1, "file_name": "x" * 10_000 + ".png"}])),
      "x" * 10_000 + ".png", "file not found"),
    R("coco_file_name_dot", coco(doc(images_=[{"id": 1, "file_name": "./"}])), None, "c.json image id 1",
      "file not found"),
    R("coco_file_with_other_extension",
      coco(doc(images_=[{"id": 1, "file_name": "g.gif"}]), extra=lambda t, r: (r / "g.gif").write_bytes(b"GIF89a")),
      "g.gif", "extension is not in dataset.extensions"),
    R("coco_image_listed_twice",
      coco(doc(images_=[IMG_A, {"id": 2, "file_name": "./a.png"}], anns=[ann(), ann(id=2, image_id=2)])), "a.png",
      "annotated 2 times"),
    OK("coco_category_name_lone_surrogate", coco(doc(cats=[{"id": 1, "name": "cr\udcffack"}])), "a.png", 1,
       defects=(4,)),
    OK("coco_image_width_10e400_is_only_a_hint", coco(doc(images_=[{**IMG_A, "width": HUGE}])), "a.png", 1,
       defects=(5,)),
    # the id files of init
    E("labeled_file_latin1", coco(labeled=ids_file(b"a\xe9\n", "lab.txt")), "--labeled", "lab.txt",
      "not valid UTF-8",
      defects=(5,)),
    E("test_file_latin1", coco(test=ids_file(b"caf\xe9\n", "tst.txt")), "tst.txt", "not valid UTF-8", defects=(5,)),
    E("labeled_file_unknown_image", coco(labeled=ids_file("nope\n", "lab.txt")), "lab.txt",
      "unknown image id(s): line 1 'nope'"),
    E("labeled_and_test_overlap", coco(names=("a.png", "b.png"), labeled=ids_file("a\n", "lab.txt"),
                                       test=ids_file("a.png\n", "tst.txt")), "lab.txt", "tst.txt", "a.png"),
    E("labeled_file_covers_the_whole_pool", coco(labeled=ids_file("a\n", "lab.txt")), "lab.txt",
      "lists the whole pool"),
    E("labeled_without_annotations", lambda t: {"images": images(t, "a.png"), "labeled": ids_file("a\n")(t)},
      "labeled images need annotations"),
]

# --------------------------------------------------------------------------- init: VOC
VOC = [
    R("voc_xml_parse_error", voc({"a.xml": "<annotation><filename>a.png</filename><object>"}), "a.png",
      "a.xml: XML parse error"),
    R("voc_dtd_entities", voc({"a.xml": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><annotation/>'}),
      "a.png", "a.xml: DTD / entity declarations are not allowed"),
    R("voc_bogus_encoding", voc({"a.xml": voc_xml(head='<?xml version="1.0" encoding="bogus-enc"?>')}), "a.png",
      "a.xml", "unknown encoding", "bogus-enc", defects=(5,)),
    R("voc_latin1_bytes_without_declaration", voc({"a.xml": voc_xml(objects=[("caf\xe9", (1, 1, 5, 5))])
                                                   .encode("latin-1")}), "a.png", "a.xml: XML parse error"),
    OK("voc_latin1_declared", voc({"a.xml": voc_xml(objects=[("caf\xe9", (1, 1, 5, 5))],
                                                    head='<?xml version="1.0" encoding="ISO-8859-1"?>')
                                   .encode("latin-1")}), "a.png", 1),
    R("voc_size_width_inf", voc({"a.xml": voc_xml(size=("inf", H))}), "a.png", "a.xml size", "width is inf",
      defects=(5,)),
    R("voc_size_width_1e400", voc({"a.xml": voc_xml(size=("1e400", H))}), "a.png", "a.xml size",
      "width is 1e400", defects=(5,)),
    R("voc_size_height_nan", voc({"a.xml": voc_xml(size=(W, "nan"))}), "a.png", "a.xml size", "height is nan", defects=(5,)),
    R("voc_size_width_text", voc({"a.xml": voc_xml(size=("wide", H))}), "a.png", "a.xml size",
      "width 'wide' is not a number", defects=(5,)),
    R("voc_filename_escapes_the_root", voc({"a.xml": voc_xml(filename="../../../etc/hostname")}),
      "../../../etc/hostname", "a.xml filename '../../../etc/hostname': path escapes images root", defects=(14,)),
    R("voc_filename_absolute_outside", voc({"a.xml": voc_xml(filename="/etc/hostname")}), "/etc/hostname",
      "a.xml filename '/etc/hostname': path escapes images root", defects=(14,)),
    OK("voc_filename_absolute_inside_root", lambda t: voc({"a.xml": voc_xml(filename=str(t / "imgs" / "a.png"))})(t),
       "a.png", 1, defects=(14,)),
    OK("voc_filename_with_a_real_backslash", voc({"x.xml": voc_xml(filename="back\\slash.png")},
                                                 names=("back\\slash.png", "slash.png")),
       "back\\slash.png", 1, defects=(14,)),
    OK("voc_xml_named_with_a_backslash", voc({"back\\slash.xml": voc_xml(filename=None)},
                                             names=("back\\slash.png",)), "back\\slash.png", 1, defects=(14,)),
    R("voc_filename_missing_file", voc({"a.xml": voc_xml(filename="orphan.png"), "orphan.xml":
                                        voc_xml(filename="orphan.png")}), "orphan.png",
      "orphan.xml filename 'orphan.png': file not found"),
    R("voc_box_nan", voc({"a.xml": voc_xml(objects=[("crack", (1, 1, "nan", 5))])}), "a.png",
      "a.xml object 1 bndbox: xmax is nan"),
    R("voc_box_1e400", voc({"a.xml": voc_xml(objects=[("crack", (1, 1, "1e400", 5))])}), "a.png",
      "a.xml object 1 bndbox: xmax is 1e400", defects=(5,)),
    R("voc_box_text", voc({"a.xml": voc_xml(objects=[("crack", (1, "one", 4, 5))])}), "a.png",
      "bndbox: ymin 'one' is not a number"),
    R("voc_box_inverted", voc({"a.xml": voc_xml(objects=[("crack", (20, 1, 10, 5))])}), "a.png",
      "bndbox: xmax 10 < xmin 20"),
    R("voc_box_outside", voc({"a.xml": voc_xml(objects=[("crack", (1, 1, 45, 5))])}), "a.png",
      "bndbox: x2 45 > image width 40"),
    R("voc_box_missing_coordinate", voc({"a.xml": voc_xml(objects=[("crack", (1, 1, 4, None))])}), "a.png",
      "bndbox: ymax missing"),
    R("voc_object_without_name", voc({"a.xml": voc_xml(objects=[("", (1, 1, 4, 4))])}), "a.png",
      "a.xml object 1 name: missing or empty"),
    R("voc_object_without_bndbox", voc({"a.xml": "<annotation><filename>a.png</filename><object><name>c</name>"
                                                 "</object></annotation>"}), "a.png", "object 1 bndbox: missing"),
    R("voc_two_files_for_one_image", voc({"a.xml": voc_xml(), "b.xml": voc_xml()}), "a.png", "annotated 2 times"),
    R("voc_xml_is_a_fifo", voc({}, extra=lambda t, r: fifo(t / "xml" / "a.xml")), "a.png", "a.xml",
      "not a regular file"),
    R("voc_xml_with_non_utf8_name",
      voc({}, extra=lambda t, r: (nonutf8_png(t, r), raw_file(t / "xml", b"bad\xff.xml", voc_xml(None).encode()))),
      "bad\\xff.png", "not valid UTF-8", defects=(4,)),
    OK("voc_deeply_nested_extra_element", voc({"a.xml": voc_xml().replace(
        "</annotation>", "<x>" + "<y>" * 20000 + "</y>" * 20000 + "</x></annotation>")}), "a.png", 1),
]

# --------------------------------------------------------------------------- init: YOLO
YAML_TAG = 'names: !!python/object/apply:os.system ["touch {marker}"]\n'
YOLO = [
    E("yolo_data_yaml_python_tag",
      lambda t: yolo(classes=None, extra=lambda t2, r: (t2 / "labels" / "data.yaml").write_text(
          YAML_TAG.format(marker=t2 / "executed")))(t),
      "data.yaml", "not valid YAML", "python/object/apply", absent="executed", defects=(5,)),
    E("yolo_data_yaml_python_name_tag", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                             .write_text("names: [!!python/name:os.system a]\n")),
      "data.yaml", "not valid YAML", defects=(5,)),
    E("yolo_data_yaml_syntax_error", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                          .write_text("names: [a, b\n")), "data.yaml", "not valid YAML", defects=(5,)),
    E("yolo_data_yaml_nested_100k", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                         .write_text("names: " + DEEP)), "data.yaml", "nested deeper", defects=(5,)),
    E("yolo_data_yaml_deep_block_items", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                              .write_text("names:\n" + "- " * 5000 + "x\n")),
      "data.yaml", "nested deeper", defects=(5,)),
    E("yolo_data_yaml_latin1", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                    .write_bytes("names: [caf\xe9]\n".encode("latin-1"))),
      "data.yaml", "not valid UTF-8", defects=(5,)),
    E("yolo_data_yaml_without_names", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                           .write_text("nc: 1\n")), "data.yaml", "no 'names' list"),
    E("yolo_data_yaml_names_bad_keys", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                            .write_text("names: {a: crack}\n")), "data.yaml",
      "'names' keys must be class indices"),
    E("yolo_data_yaml_names_gap", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                       .write_text("names: {0: crack, 2: dent}\n")), "data.yaml",
      "'names' indices must be 0..1"),
    E("yolo_data_yaml_nested_name", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                         .write_text("names: [[a, b]]\n")), "data.yaml", "names[0]",
      "not a class name"),
    E("yolo_data_yaml_alias_bomb", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefgh", "bcdefghi")) + "names: [*i]\n")), "data.yaml", "names[0]",
      "not a class name"),
    E("yolo_data_yaml_duplicate_name", yolo(classes=None, extra=lambda t, r: (t / "labels" / "data.yaml")
                                            .write_text("names: [a, a]\n")), "data.yaml", "duplicate class name"),
    E("yolo_classes_txt_latin1", yolo(classes="caf\xe9\n".encode("latin-1")), "classes.txt", "not valid UTF-8",
      defects=(5,)),
    E("yolo_classes_txt_duplicate", yolo(classes="a\nb\na\n"), "classes.txt", "duplicate class name 'a'"),
    E("yolo_without_class_names", yolo(classes=None), "need class names", "classes.txt", "data.yaml"),
    E("yolo_folder_with_xml_and_txt", lambda t: {**yolo({"a.txt": "", "b.xml": "<a/>"})(t), "fmt": None},
      "both .xml", "pass --format"),
    R("yolo_class_out_of_range", yolo({"a.txt": "5 0.5 0.5 0.1 0.1\n"}), "a.png",
      "a.txt line 1 class: index 5 out of range 0..0"),
    R("yolo_class_not_an_integer", yolo({"a.txt": "x 0.5 0.5 0.1 0.1\n"}), "a.png", "a.txt line 1 class: 'x'"),
    R("yolo_class_1e400", yolo({"a.txt": "1e400 0.5 0.5 0.1 0.1\n"}), "a.png", "class: '1e400' is not an integer",
      defects=(5,)),
    R("yolo_four_values", yolo({"a.txt": "0 0.5 0.5 0.1\n"}), "a.png", "a.txt line 1: expected 5 values"),
    R("yolo_nan", yolo({"a.txt": "0 nan 0.5 0.1 0.1\n"}), "a.png", "a.txt line 1: cx is nan"),
    R("yolo_1e400", yolo({"a.txt": "0 0.5 0.5 1e400 0.1\n"}), "a.png", "a.txt line 1: w is 1e400", defects=(5,)),
    R("yolo_negative_size", yolo({"a.txt": "0 0.5 0.5 -0.1 0.1\n"}), "a.png", "a.txt line 1: w -0.1 < 0"),
    R("yolo_outside", yolo({"a.txt": "0 0.95 0.5 0.5 0.1\n"}), "a.png", "x2 48 > image width 40"),
    R("yolo_label_latin1", yolo({"a.txt": "0 0.5 0.5 0.1 0.1 # caf\xe9\n".encode("latin-1")}), "a.png",
      "a.txt: not UTF-8 text"),
    R("yolo_label_is_a_fifo", yolo({}, extra=lambda t, r: fifo(t / "labels" / "a.txt")), "a.png", "a.txt",
      "not a regular file"),
    R("yolo_label_without_image", yolo({"a.txt": "", "orphan.txt": ""}), "orphan", "orphan.txt",
      "file not found"),
    OK("yolo_label_with_a_real_backslash", yolo({"back\\slash.txt": "0 0.5 0.5 0.25 0.25\n"},
                                                names=("back\\slash.png",)), "back\\slash.png", 1, defects=(14,)),
    R("yolo_label_with_non_utf8_name",
      yolo({}, extra=lambda t, r: (nonutf8_png(t, r), raw_file(t / "labels", b"bad\xff.txt", b"0 .5 .5 .1 .1\n"))),
      "bad\\xff.png", "not valid UTF-8", defects=(4,)),
]

INIT = FOLDER + COCO + VOC + YOLO


# --------------------------------------------------------------------------- import
def answers(content: Any = None, *, text: str | None = None, raw: bytes | None = None, name: str = "answers.json",
            fmt: str | None = None) -> Callable[[Path, ImportContext], dict]:
    """An answer file: `content(ctx)` (a document) or JSON text / raw bytes."""

    def write(tmp: Path, ctx: ImportContext) -> dict:
        p = tmp / name
        if raw is not None:
            p.write_bytes(raw)
        elif text is not None:
            p.write_text(text)
        else:
            p.write_text(json.dumps(content(ctx)))
        return {"path": p, "fmt": fmt}

    return write


def acoco(images_=None, anns=None, cats: Any = None, **over) -> Callable[[ImportContext], dict]:
    """A COCO answer document for a.png (callables get ctx)."""

    def make(ctx: ImportContext) -> dict:
        ims = images_(ctx) if callable(images_) else images_
        if ims is None:
            ims = [{"id": 1, "file_name": "a.png", "width": IW, "height": IH}]
        d = {"images": ims,
             "annotations": anns if anns is not None else [
                 {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}],
             "categories": cats if cats is not None else [{"id": 1, "name": "crack"}, {"id": 2, "name": "dent"}]}
        d.update(over)
        return {k: v for k, v in d.items() if v is not OMIT}

    return make


def aann(**over) -> dict:
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}
    a.update(over)
    return a


def rect(**over) -> dict:
    """A Label Studio rectangle result; keys of `over` go to its value unless they are
    result keys (original_width, original_height, type, id)."""
    r = {"id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
         "original_width": IW, "original_height": IH,
         "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["crack"]}}
    for k, v in over.items():
        if k in ("original_width", "original_height", "type", "id"):
            r[k] = v
        elif v is OMIT:
            r["value"].pop(k, None)
        else:
            r["value"][k] = v
    return r


def als(*results, key: str = "a.png", task: dict | None = None, tasks: int = 1) -> Callable[[ImportContext], list]:
    """A Label Studio export of one task (for `key`) answered with `results`."""

    def make(ctx: ImportContext) -> list:
        t = {"id": 1, "data": {"image": ctx.uris[key], "image_id": ctx.ids[key]},
             "annotations": [{"id": 1, "was_cancelled": False, "result": list(results)}], "predictions": []}
        t.update(task or {})
        return [t] * tasks

    return make


def I(name, write, *match, **kw) -> Kind:
    return Kind(name, "import", write, "error", tuple(match), exc=ValueError, **kw)


def non_utf8_answers_file(tmp: Path, ctx: ImportContext) -> dict:
    path = Path(os.fsdecode(os.fsencode(str(tmp)) + b"/ans\xff.json"))
    path.write_text(json.dumps(acoco()(ctx)))
    return {"path": path, "fmt": None}


IMPORT = [
    I("import_not_json", answers(text="{"), "answers.json", "not valid JSON"),
    I("import_not_utf8", answers(raw=b'[{"data": "caf\xe9"}]'), "answers.json", "not valid JSON"),
    I("import_nested_100k_deep", answers(text=DEEP), "answers.json", "not valid JSON", "nested too deeply",
      defects=(6,)),
    I("import_integer_of_5000_digits", answers(text="[" + "9" * 5000 + "]"), "answers.json", "not valid JSON",
      "digits", defects=(6,)),
    I("import_neither_format", answers(lambda c: {"tasks": []}), "answers.json", "neither a COCO file"),
    I("import_unknown_format_name", answers(acoco(), fmt="yolo"), "answers.json", "unknown answer format 'yolo'"),
    Kind("import_answers_file_with_non_utf8_name", "import", non_utf8_answers_file, "ok", defects=(4,)),
    I("import_missing_file", lambda t, c: {"path": t / "nope.json", "fmt": None}, "nope.json", "file not found"),
    # COCO answers
    I("coco_answer_bbox_10e400", answers(acoco(anns=[aann(bbox=[HUGE, 2, 10, 10])])), "answers.json",
      "annotation id 1", "bbox", "x <401-digit integer> is too large", defects=(6,)),
    I("coco_answer_bbox_width_10e400", answers(acoco(anns=[aann(bbox=[2, 2, HUGE, 10])])), "answers.json",
      "bbox", "width", "too large", defects=(6,)),
    I("coco_answer_image_width_10e400", answers(acoco(images_=[{"id": 1, "file_name": "a.png", "width": HUGE,
                                                                "height": IH}])),
      "answers.json", "images[0]", "differs from the image's 64x48", defects=(6,)),
    I("coco_answer_category_id_list", answers(acoco(cats=[{"id": [1], "name": "crack"}])), "answers.json",
      "categories[0] id", "not an integer", defects=(6,)),
    I("coco_answer_category_id_dict", answers(acoco(cats=[{"id": {"a": 1}, "name": "crack"}])), "answers.json",
      "categories[0] id", "not an integer", defects=(6,)),
    I("coco_answer_annotation_id_list", answers(acoco(anns=[aann(id=[1])])), "answers.json",
      "annotations[0] id: [1] is not an integer", defects=(6,)),
    I("coco_answer_annotation_id_dict", answers(acoco(anns=[aann(id={"a": 1})])), "answers.json",
      "annotations[0] id", "is not an integer", defects=(6,)),
    I("coco_answer_duplicate_annotation_id", answers(acoco(anns=[aann(), aann()])), "answers.json",
      "annotation id 1", "duplicate annotation id"),
    I("coco_answer_category_id_list_in_annotation", answers(acoco(anns=[aann(category_id=[1])])), "answers.json",
      "category_id: [1] is not a category id"),
    I("coco_answer_unknown_category", answers(acoco(anns=[aann(category_id=9)])), "answers.json",
      "category_id: unknown category 9"),
    I("coco_answer_category_name_not_in_run", answers(acoco(cats=[{"id": 1, "name": "rust"}])), "answers.json",
      "unknown category 'rust'"),
    I("coco_answer_categories_not_a_list", answers(acoco(cats={"1": "crack"})), "answers.json",
      "'categories' must be a list"),
    I("coco_answer_annotations_not_a_list", answers(acoco(annotations={"1": {}})), "answers.json",
      "'annotations' must be a list"),
    I("coco_answer_image_id_list", answers(acoco(images_=[{"id": [1], "file_name": "a.png"}], anns=[])),
      "answers.json", "images[0] id"),
    I("coco_answer_duplicate_image_id", answers(acoco(images_=[{"id": 1, "file_name": "a.png"},
                                                               {"id": 1, "file_name": "b.png"}], anns=[])),
      "answers.json", "images[1]", "duplicate image id 1"),
    I("coco_answer_unknown_file_name", answers(acoco(images_=[{"id": 1, "file_name": "zzz.png"}], anns=[])),
      "answers.json", "file_name 'zzz.png'", "unknown image"),
    I("coco_answer_file_name_lone_surrogate", answers(acoco(images_=[{"id": 1, "file_name": "a\udcff.png"}],
                                                            anns=[])), "answers.json", "unknown image",
      defects=(6,)),
    I("coco_answer_file_name_escapes", answers(acoco(images_=[{"id": 1, "file_name": "../../a.png"}], anns=[])),
      "answers.json", "path escapes the images root"),
    I("coco_answer_bbox_nan", answers(acoco(anns=[aann(bbox=[float("nan"), 2, 10, 10])])), "answers.json",
      "bbox: x is nan"),
    I("coco_answer_bbox_negative", answers(acoco(anns=[aann(bbox=[2, 2, -4, 10])])), "answers.json",
      "bbox: negative width -4"),
    I("coco_answer_bbox_outside", answers(acoco(anns=[aann(bbox=[60, 2, 10, 10])])), "answers.json",
      "x2 70 > image width 64"),
    I("coco_answer_bbox_strings", answers(acoco(anns=[aann(bbox="2 2 10 10")])), "answers.json",
      "bbox: expected [x, y, width, height]"),
    I("coco_answer_annotation_of_unknown_image", answers(acoco(anns=[aann(image_id=5)])), "answers.json",
      "image_id: unknown image id 5"),
    I("coco_answer_image_not_selected", answers(acoco(images_=[{"id": 1, "file_name": "c.png"}], anns=[])),
      "answers.json", "c.png", "selection"),
    # Label Studio answers
    I("ls_x_10e400", answers(als(rect(x=HUGE))), "answers.json", "tasks[0]", "value", "x <401-digit integer> is "
                                                                                      "too large", defects=(6,)),
    I("ls_height_10e400", answers(als(rect(height=HUGE))), "answers.json", "value", "height", "too large",
      defects=(6,)),
    I("ls_original_width_10e400", answers(als(rect(original_width=HUGE))), "answers.json", "tasks[0]",
      "original size <401-digit integer>x48 differs", defects=(6,)),
    I("ls_rotation_10e400", answers(als(rect(rotation=HUGE))), "answers.json", "value.rotation", defects=(6,)),
    I("ls_rotation_nonzero", answers(als(rect(rotation=30))), "answers.json", "value.rotation: 30"),
    I("ls_x_nan", answers(als(rect(x=float("nan")))), "answers.json", "value: x is nan"),
    I("ls_x_string", answers(als(rect(x="10"))), "answers.json", "x, y, width, height must be numbers"),
    I("ls_x_missing", answers(als(rect(x=OMIT))), "answers.json", "x, y, width, height must be numbers"),
    I("ls_unknown_label", answers(als(rect(rectanglelabels=["rust"]))), "answers.json",
      "value.rectanglelabels: unknown category 'rust'"),
    I("ls_two_labels", answers(als(rect(rectanglelabels=["crack", "dent"]))), "answers.json",
      "expected exactly one label"),
    I("ls_polygon", answers(als(rect(type="polygonlabels"))), "answers.json", "'polygonlabels' regions"),
    I("ls_value_not_an_object", answers(als({"id": "r", "type": "rectanglelabels", "value": [1]})), "answers.json",
      "value: missing or not an object"),
    I("ls_box_outside", answers(als(rect(x=95))), "answers.json", "outside the image"),
    I("ls_box_too_small", answers(als(rect(width=0.5))), "answers.json", "smaller than 1 px"),
    I("ls_only_predictions", answers(als(task={"annotations": []})), "answers.json",
      "none of its 1 tasks has an annotation"),
    I("ls_annotations_not_a_list", answers(als(task={"annotations": {"a": 1}})), "answers.json", "tasks[0]",
      "'annotations' must be a list"),
    I("ls_image_id_list", answers(als(rect(), task={"data": {"image_id": [1]}})), "answers.json",
      "data.image_id: unknown image [1]"),
    I("ls_image_not_a_string", answers(als(rect(), task={"data": {"image": 7}})), "answers.json",
      "data.image: expected a string"),
    I("ls_task_answered_twice", answers(als(rect(), tasks=2)), "answers.json", "answered twice"),
    I("ls_task_without_data", answers(lambda c: [{"id": 1, "annotations": []}], fmt="label_studio"),
      "answers.json", "tasks[0]", "'data'"),
]


# --------------------------------------------------------------------------- config
def overrides(*texts: str) -> Callable[[Path], dict]:
    return lambda tmp: {"paths": [], "overrides": list(texts)}


def config_file(text: str, name: str = "bad.yaml") -> Callable[[Path], dict]:
    def write(tmp: Path) -> dict:
        p = tmp / name
        p.write_text(text)
        return {"paths": [p], "overrides": []}

    return write


def C(name, write, *match) -> Kind:
    return Kind(name, "config", write, "error", tuple(match))


CONFIG = [
    C("train_epochs_0", overrides("train.epochs=0"), "train.epochs: must be >= 1"),
    C("train_epochs_negative", overrides("train.epochs=-1"), "train.epochs: must be >= 1"),
    C("train_epochs_text", overrides("train.epochs=many"), "'train.epochs' must be an integer"),
    C("train_lr_nan", overrides("train.lr=.nan"), "train.lr: must be a finite number"),
    C("train_lr_nan_word", overrides("train.lr=nan"), "'train.lr' must be a number"),
    C("train_lr_inf", overrides("train.lr=.inf"), "train.lr: must be a finite number"),
    C("train_lr_zero", overrides("train.lr=0"), "train.lr: must be > 0"),
    C("train_batch_size_0", overrides("train.batch_size=0"), "train.batch_size: must be >= 1"),
    C("score_batch_size_0", overrides("score.batch_size=0"), "score.batch_size: must be >= 1"),
    C("detector_input_size_0", overrides("detector.input_size=0"), "detector.input_size: must be >= 32"),
    C("seed_negative", overrides("seed=-1"), "seed: must be >= 0"),
    C("seed_float", overrides("seed=1.5"), "'seed' must be an integer"),
    C("unknown_key", overrides("train.epoch=3"), "unknown key 'train.epoch'"),
    C("dataset_max_pixels_0", overrides("dataset.max_pixels=0"), "dataset.max_pixels: must be >= 1"),
    C("dataset_classes_repeated", overrides("dataset.classes=[a, a]"), "dataset.classes: must not repeat"),
    C("file_value_out_of_range", config_file("train:\n  epochs: 0\n"), "train.epochs: must be >= 1", "bad.yaml"),
    C("file_unknown_key", config_file("trian:\n  epochs: 2\n"), "bad.yaml", "unknown key 'trian'"),
    C("file_not_a_mapping", config_file("- 1\n- 2\n"), "bad.yaml", "top level must be a mapping"),
]

ALL = INIT + IMPORT + CONFIG
