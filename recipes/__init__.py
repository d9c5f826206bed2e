"""Runnable recipes, shipped inside the package as ``vlmtune.recipes`` (``vlmtune train`` runs ``latex_ocr``)."""
