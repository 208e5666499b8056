"""The study: params.yaml's tables as trials (`rows`), swept with Ray Tune (`sweep`) into results files
(`results`), and costed before it runs (`plan`)."""
