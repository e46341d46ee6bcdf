"""Reading from and writing back to a PACS: DICOMweb (dicomweb.py) and DIMSE (dimse.py) access, the
DICOM SR of a screening result (report.py) and its Grad-CAM overlay as a Secondary Capture (overlay.py)."""
