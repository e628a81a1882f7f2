"""The 19 classes of the HPA single-cell challenge, defined once for every stage."""

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES: int = len(CLASS_NAMES)
NEGATIVE: int = CLASS_NAMES.index("Negative")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}


def class_slug(name: str) -> str:
    """The short file-name form of a class: its first word, lower case ('Mitotic spindle' -> 'mitotic')."""
    return name.lower().split()[0]


def class_index(name_or_index: str | int) -> int:
    """Index of a class given its name (case-insensitive) or its index as int or digit string."""
    if isinstance(name_or_index, int) or str(name_or_index).isdigit():
        index = int(name_or_index)
        if not 0 <= index < NUM_CLASSES:
            raise ValueError(f"class index {index} outside 0..{NUM_CLASSES - 1}")
        return index
    lowered = {name.lower(): i for name, i in CLASS_INDEX.items()}
    try:
        return lowered[str(name_or_index).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown class {name_or_index!r}; known: {', '.join(CLASS_NAMES)}") from None
