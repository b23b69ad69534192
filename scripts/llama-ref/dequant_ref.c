/* Dequantizes GGUF blocks with ggml's own row decoder (the public type traits' to_float) and
 * prints the values, one per line with 9 significant digits (exact for f32).
 *
 * usage: dequant_ref TYPE_ID N_ELEMENTS < blocks.bin
 * Reads ggml_row_size(TYPE, N_ELEMENTS) bytes of blocks from stdin. Written for pshard's
 * fixture script (scripts/llama-ref/make-fixtures.sh); links against a llama.cpp build. */
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TYPE_ID N_ELEMENTS < blocks.bin\n", argv[0]);
        return 2;
    }
    const int type = atoi(argv[1]);
    const long long n = atoll(argv[2]);
    if (type < 0 || type >= GGML_TYPE_COUNT || n <= 0) {
        fprintf(stderr, "bad type id %d or element count %lld\n", type, n);
        return 2;
    }
    const struct ggml_type_traits *tr = ggml_get_type_traits((enum ggml_type)type);
    if (tr->to_float == NULL || n % tr->blck_size != 0) {
        fprintf(stderr, "type %s: no to_float, or %lld is not whole blocks of %lld\n",
                tr->type_name, n, (long long)tr->blck_size);
        return 2;
    }
    const size_t bytes = ggml_row_size((enum ggml_type)type, n);
    unsigned char *buf = malloc(bytes);
    float *out = malloc((size_t)n * sizeof(float));
    if (buf == NULL || out == NULL) return 1;
    if (fread(buf, 1, bytes, stdin) != bytes) {
        fprintf(stderr, "expected %zu bytes of blocks on stdin\n", bytes);
        return 2;
    }
    tr->to_float(buf, out, n);
    for (long long i = 0; i < n; i++) printf("%.9g\n", out[i]);
    free(buf);
    free(out);
    return 0;
}
