/*
 * A region of a JPEG at a DCT-scaled size, decoded with libjpeg-turbo's libjpeg API.
 *
 * libjpeg-turbo (1.5+) can do three things at once that no Python binding exposes together: DCT
 * scaling (scale_denom 1, 2, 4 or 8: the inverse DCT computes the reduced image directly), a
 * horizontal crop (jpeg_crop_scanline: only the crop's columns are transformed and color-converted)
 * and skipped rows (jpeg_skip_scanlines: rows above the region are entropy-decoded but not
 * transformed; decoding stops after the region's last row). OpenCV offers the first, nvImageCodec's
 * CPU decoder the other two. The pixels returned are bit-identical to the same rows and columns of a
 * whole decode at the same scale: skipped rows keep the upsampler's context, and the crop is widened
 * (to iMCU boundaries, and by MARGIN columns each side whose chroma was upsampled from the crop's edge
 * rather than from its neighbours, then dropped).
 *
 * decode(raw, channels, denom, top, left, bottom, right) -> (bytearray, col0, cols)
 *   raw:       the JPEG file's bytes (any object with the buffer protocol);
 *   channels:  3 for RGB (grey files replicated), 1 for grey (a color file's luma plane), as OpenCV's
 *              IMREAD_COLOR (then BGR -> RGB) and IMREAD_GRAYSCALE give them;
 *   denom:     1, 2, 4 or 8; the output image is ceil(W / denom) x ceil(H / denom);
 *   top, left, bottom, right: the region wanted, in pixels of the output image, half-open.
 * Returns the pixels of rows [top, bottom) and columns [col0, col0 + cols), uint8, row-major,
 * interleaved (channels per pixel), where [col0, col0 + cols) contains [left, right) (a few columns
 * more on either side: whatever the iMCU alignment gives).
 * Raises ValueError with libjpeg's message for a file it cannot decode, and also when it warned while
 * decoding down to the region's last row (corrupt data it would skip or resynchronise over): the
 * caller's exact decoder decides what such a file gives, so that every path treats it alike. Damage
 * below the region is never read, so it is never seen.
 *
 * The GIL is released while libjpeg transforms rows; the input buffer stays held meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* Columns decoded beyond each side of the region and dropped (see decode()). */
#define MARGIN 2

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
};

static void error_exit(j_common_ptr cinfo)
{
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

/* Warnings are counted (pub.num_warnings), never printed: the caller refuses a file that had any. */
static void output_message(j_common_ptr cinfo)
{
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
}

static PyObject *decode(PyObject *self, PyObject *args)
{
    Py_buffer raw;
    int channels, denom, top, left, bottom, right;
    if (!PyArg_ParseTuple(args, "y*iiiiii:decode", &raw, &channels, &denom, &top, &left, &bottom, &right))
        return NULL;
    if ((channels != 1 && channels != 3) || (denom != 1 && denom != 2 && denom != 4 && denom != 8)) {
        PyBuffer_Release(&raw);
        PyErr_Format(PyExc_ValueError, "channels must be 1 or 3 and denom 1, 2, 4 or 8, got %d and %d", channels, denom);
        return NULL;
    }

    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    /* volatile: read after a longjmp back into this frame */
    PyObject *volatile out = NULL;
    volatile int gil_released = 0;
    PyThreadState *volatile thread_state = NULL;
    unsigned char *volatile row_buffer = NULL;
    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = error_exit;
    err.pub.output_message = output_message;
    err.message[0] = '\0';

    if (setjmp(err.escape)) {
        if (gil_released)
            PyEval_RestoreThread(thread_state);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&raw);
        Py_XDECREF(out);
        PyMem_RawFree(row_buffer);
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)raw.buf, (unsigned long)raw.len);
    jpeg_read_header(&cinfo, TRUE);
    if (channels == 3) {
        cinfo.out_color_space = JCS_EXT_RGB;
    } else {
        cinfo.out_color_space = JCS_GRAYSCALE;
    }
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);

    int height = (int)cinfo.output_height, width = (int)cinfo.output_width;
    if (top < 0 || left < 0 || bottom > height || right > width || top >= bottom || left >= right) {
        char why[160];
        snprintf(why, sizeof(why), "region rows [%d, %d) x columns [%d, %d) is not inside the %d x %d image",
                 top, bottom, left, right, width, height);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&raw);
        PyErr_SetString(PyExc_ValueError, why);
        return NULL;
    }
    /* Fancy upsampling of subsampled chroma fills the first (last) column of a crop from the crop's own
     * edge, not from its neighbour: ask for MARGIN more columns on each side and keep only the columns
     * that are bit-identical to a whole decode's. */
    JDIMENSION col0 = (JDIMENSION)(left > MARGIN ? left - MARGIN : 0);
    JDIMENSION stop = (JDIMENSION)(right + MARGIN < width ? right + MARGIN : width);
    JDIMENSION cols = stop - col0;
    if (cols < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &col0, &cols); /* widened to iMCU boundaries */
    JDIMENSION keep0 = col0 > 0 ? col0 + MARGIN : 0;
    JDIMENSION keep1 = col0 + cols < (JDIMENSION)width ? col0 + cols - MARGIN : (JDIMENSION)width;
    size_t decoded_stride = (size_t)cols * (size_t)channels;
    size_t stride = (size_t)(keep1 - keep0) * (size_t)channels;
    size_t skip = (size_t)(keep0 - col0) * (size_t)channels;
    int rows = bottom - top;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(stride * (size_t)rows));
    row_buffer = PyMem_RawMalloc(decoded_stride);
    if (out == NULL || row_buffer == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&raw);
        Py_XDECREF(out);
        PyMem_RawFree(row_buffer);
        return PyErr_NoMemory();
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);

    thread_state = PyEval_SaveThread();
    gil_released = 1;
    if (top > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    while ((int)cinfo.output_scanline < bottom) {
        unsigned char *target = pixels + stride * (size_t)(cinfo.output_scanline - (JDIMENSION)top);
        JSAMPROW row = row_buffer;
        jpeg_read_scanlines(&cinfo, &row, 1);
        memcpy(target, row_buffer + skip, stride);
    }
    int warnings = (int)err.pub.num_warnings;
    /* The rows below the region are never decoded: abort rather than finish. */
    jpeg_destroy_decompress(&cinfo);
    gil_released = 0;
    PyEval_RestoreThread(thread_state);
    PyBuffer_Release(&raw);
    PyMem_RawFree(row_buffer);
    if (warnings) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", err.message);
        return NULL;
    }
    return Py_BuildValue("(Nii)", out, (int)keep0, (int)(keep1 - keep0));
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(raw, channels, denom, top, left, bottom, right) -> (bytearray, col0, cols): rows [top, bottom) "
     "and columns [col0, col0 + cols) (containing [left, right)) of the JPEG decoded at 1/denom scale."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_libjpeg_region",
    "A region of a JPEG at a DCT-scaled size, decoded with libjpeg-turbo (crop, skip-scanlines, scaling).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__libjpeg_region(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
                                LIBJPEG_TURBO_VERSION_NUMBER
#else
                                0
#endif
                                ) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
