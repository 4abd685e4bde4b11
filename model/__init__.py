"""AllDS model package: networks, preprocessing, data, training, evaluation, export, inference."""
