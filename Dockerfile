# A CPU image that serves one sagekit model over the OpenAI API (`sagekit serve`). The model is not in the
# image: mount a compressed folder (sagekit compress MODEL out/) at /model when the container starts.
#
#   docker build -t sagekit .
#   docker run --rm -p 8000:8000 -v "$PWD/out:/model:ro" -e SAGEKIT_API_KEY=change-me sagekit
#
# It listens on 0.0.0.0 inside the container, so it refuses to start without an API key (SAGEKIT_API_KEY).
# Clients send "Authorization: Bearer change-me"; /health needs no key (the HEALTHCHECK below uses it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache

# runtime + serve extras only: no compiler, no test or demo packages, no SciPy (the image serves; it does not
# compress); every dependency ships as a wheel
COPY pyproject.toml README.md LICENSE /src/
COPY sagekit /src/sagekit
RUN pip install "/src[serve]" && rm -rf /src

# an unprivileged user; Numba's compiled-kernel cache goes to /tmp (site-packages is not writable for it)
RUN useradd --create-home --uid 10001 sagekit
USER sagekit
WORKDIR /home/sagekit

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["sagekit", "serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]
