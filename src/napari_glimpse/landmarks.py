"""Names of the 19 ISBI 2015 cephalometric landmarks, in the column order of the data."""

ISBI_LANDMARKS: tuple[str, ...] = (
    "Sella",
    "Nasion",
    "Orbitale",
    "Porion",
    "Subspinale (A point)",
    "Supramentale (B point)",
    "Pogonion",
    "Menton",
    "Gnathion",
    "Gonion",
    "Lower incisal incision",
    "Upper incisal incision",
    "Upper lip",
    "Lower lip",
    "Subnasale",
    "Soft tissue pogonion",
    "Posterior nasal spine",
    "Anterior nasal spine",
    "Articulare",
)

ISBI_ABBREVIATIONS: tuple[str, ...] = (
    "S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go",
    "LIT", "UIT", "UL", "LL", "Sn", "Pog'", "PNS", "ANS", "Ar",
)

ISBI_PIXEL_SPACING_MM = 0.1
