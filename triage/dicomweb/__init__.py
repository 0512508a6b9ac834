"""DICOMweb read side: QIDO-RS search (``query``) and WADO-RS retrieve (``retrieve``)."""
