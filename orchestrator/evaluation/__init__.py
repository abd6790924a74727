"""Evaluating rows and reporting them: the rows (`rows`), rows as Ray tasks (`tasks`), tables
as text (`report`), plots (`figures`), the paper's claims judged (`claims`) and the
reproduction's written report (`reproduction`)."""
