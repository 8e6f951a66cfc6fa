"""The HTTP edge: the Klein routes (``api``), their error table (``errors``), request reading
(``requests``), API tokens and the route decorator (``auth``), and the twisted.web site with
the checks every request passes before a route runs (``site``)."""
