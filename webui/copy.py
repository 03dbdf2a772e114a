"""The words of the UI that are not in a template: example queries offered on the empty search page."""

EXAMPLE_QUERIES = (
    "cribriform glands with comedonecrosis",
    "signet ring cells infiltrating the stroma",
    "dense tumour-infiltrating lymphocytes",
    "geographic necrosis with nuclear debris",
    "mitotic figures in sheets of pleomorphic cells",
    "normal colonic mucosa with goblet cells",
)

# What the upload form accepts (search/archives/decode.py opens only these).
UPLOAD_FORMATS = "JPEG, PNG, TIFF or WebP"
