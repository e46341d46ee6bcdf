"""Site adaptation: calibrate or adapt a trained model directory to a new site's films (issue #15)."""
