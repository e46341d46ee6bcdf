"""The CNN vs CNN-LSTM comparison report (`lungray compare`) and Grad-CAM explanations.

Modules: `compare` scores the models and computes every comparison, `plots` draws the
figures, `render` writes report.md and report.html, `gradcam` explains single images (also
used by screening). Nothing is imported here, so `lungray.report.gradcam` stays light.
"""
