"""Mining cores: candidate retrieval and filters, the three MISP scores, greedy diverse selection,
proposal probabilities, the dataset card and the HTML report. No module here imports `misp_dpo.pipelines`."""
