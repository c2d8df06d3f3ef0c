"""Write `enat_diffusers/conversion/imagenet1k_id2label.json`, the ImageNet-1k class names the converter stores as
`id2label`, from the synset list and WordNet lemmas that timm ships as data files (read offline from its wheel):

    pip download timm --no-deps -d /tmp/timm && python conversion/make_imagenet_id2label.py /tmp/timm/timm-*.whl

Class `i` is the `i`-th synset of `imagenet_synsets.txt` (the order of the reference's labels); its names are the
synset's lemmas, comma-separated. A name may be given to one class only (the pipeline maps each name to one id), but
18 WordNet lemmas belong to two ImageNet synsets (e.g. "crane" the bird and the machine). Each clashing name, compared
without case, stays with the class that lists it earliest (its position among the class's lemmas, then the lower
class id) and is dropped from the other; a class left without any name gets the one qualified name in
`QUALIFIED_NAMES`.
"""

import argparse
import json
import zipfile
from pathlib import Path

INFO = "timm/data/_info/"
OUTPUT = Path(__file__).resolve().parents[1] / "enat_diffusers" / "conversion" / "imagenet1k_id2label.json"
# Classes whose every lemma is the earlier name of another class.
QUALIFIED_NAMES = {474: "cardigan (sweater)", 517: "crane (machine)"}


def read_classes(wheel: str) -> list[list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        synsets = archive.read(INFO + "imagenet_synsets.txt").decode().split()
        lines = archive.read(INFO + "imagenet_synset_to_lemma.txt").decode().splitlines()
    lemmas = dict(line.split("\t", 1) for line in lines if "\t" in line)
    return [[name.strip() for name in lemmas[synset].split(",")] for synset in synsets]


def deduplicate(classes: list[list[str]]) -> dict[int, str]:
    owner: dict[str, tuple[int, int]] = {}
    for class_id, names in enumerate(classes):
        for position, name in enumerate(names):
            key = name.casefold()
            owner[key] = min(owner.get(key, (position, class_id)), (position, class_id))
    id2label = {}
    for class_id, names in enumerate(classes):
        kept = [name for name in names if owner[name.casefold()][1] == class_id]
        id2label[class_id] = ", ".join(kept) if kept else QUALIFIED_NAMES[class_id]
    return id2label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timm_wheel", help="a timm wheel (pip download timm --no-deps)")
    id2label = deduplicate(read_classes(parser.parse_args().timm_wheel))
    if len(id2label) != 1000:
        raise SystemExit(f"expected 1000 ImageNet classes, got {len(id2label)}")
    OUTPUT.write_text(json.dumps({str(key): value for key, value in id2label.items()}, indent=0) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
